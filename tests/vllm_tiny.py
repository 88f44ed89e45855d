"""Helpers for tests/test_vllm.py: tiny converted Hugging Face models written to a directory
(``hf.upgrade`` + ``save_pretrained``), the transformers greedy reference, a word-level tokenizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

VOCAB = 160
HEAD_DIM = 32  # vLLM's CPU attention refuses head_dim 16


def tiny_config(family: str):
    import transformers as t

    common = dict(vocab_size=VOCAB, max_position_embeddings=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "llama":
        return t.LlamaConfig(**common)
    if family == "qwen3":
        return t.Qwen3Config(**common)
    if family == "mistral":
        return t.MistralConfig(**common, sliding_window=8)
    if family == "gemma3":
        return t.Gemma3TextConfig(**common, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"],
                                  query_pre_attn_scalar=24)
    raise ValueError(family)


def word_tokenizer():
    """A word-level fast tokenizer over ``VOCAB`` words ``w0 .. w{VOCAB-1}`` (specials 0-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _probe_layers(model):
    return [m for m in model.modules() if hasattr(m, "r_proj")]


def write_converted(family: str, out: Path, *, probes: str = "random", seed: int = 0) -> Path:
    """A tiny random ``family`` model upgraded by ``hf.upgrade`` and saved with ``hf.save_hf``
    (``save_pretrained`` plus ``parallax.json`` and ``reference.safetensors``, as ``parallax-compile
    convert`` writes it) and a tokenizer. ``W_R`` as ``hf.upgrade`` initialises it (random like
    ``W_Q``); ``probes="random"``: layer 0's gains 0 (``r = 0``: softmax there), layer 1's gains
    random per head with head 0 at 0; ``probes="legacy"``: gains 1 and no ``r_gain`` in the
    checkpoint (one saved before the gain existed)."""
    import transformers
    from safetensors.torch import load_file, save_file

    from parallax_compile import hf

    cfg = tiny_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa",
                                                              dtype=torch.float32).eval()
        ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
        info = hf.upgrade(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    owners = _probe_layers(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i, m in enumerate(owners):
            if probes == "legacy":
                m.r_gain.fill_(1.0)
            elif i == 0:
                m.r_gain.zero_()
            else:
                gain = torch.rand(m.r_gain.shape, generator=g) * 1.5 + 0.25
                gain[0] = 0.0
                m.r_gain.copy_(gain)
    hf.save_hf(model, out)  # as `parallax-compile convert`: save_pretrained + report + reference
    word_tokenizer().save_pretrained(out)
    if probes == "legacy":
        sd = load_file(out / "model.safetensors")
        save_file({k: v for k, v in sd.items() if not k.endswith(".r_gain")}, out / "model.safetensors",
                  metadata={"format": "pt"})
    return out


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int, *,
              zero_probes: bool = False) -> list[list[int]]:
    """transformers' greedy tokens for each prompt (one at a time, no padding), from the converted
    directory (``parallax_compile.hf.from_pretrained``); stops at EOS. ``zero_probes``: with every
    ``r_gain`` set to 0 (softmax attention), to show that the probes change the tokens."""
    from parallax_compile import hf

    model = hf.from_pretrained(path, dtype=torch.float32).eval()
    if zero_probes:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("r_gain"):
                    p.zero_()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0)
        outs.append(got[0, len(p):].tolist())
    return outs


def write_converted_gemma3_270m(out: Path, *, probes: str = "zero", seed: int = 0) -> tuple[Path, Path]:
    """Gemma 3 270M (real weights, :mod:`parallax_compile.models.gemma3`) upgraded with ``hf.upgrade``,
    ``W_R`` as ``hf.upgrade`` initialises it (random like ``W_Q``) and gains 0 (``probes="zero"``)
    or random in [0.02, 0.1] per head (``"random"``; through the q-norm ``r`` is as large as ``q``,
    so a gain near 1 turns the text into noise), saved with ``save_pretrained`` plus the tokenizer.
    Returns ``(converted dir, unconverted dir)``."""
    import shutil

    from parallax_compile import hf
    from parallax_compile.models.gemma3 import build_gemma3_270m_cache, load_gemma3_270m_model

    plain = build_gemma3_270m_cache(verbose=False)
    if (out / "config.json").exists():
        return out, plain
    model = load_gemma3_270m_model("sdpa")
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(seed))
    hf.upgrade(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in _probe_layers(model):
            if probes == "random":
                m.r_gain.copy_(torch.rand(m.r_gain.shape, generator=g) * 0.08 + 0.02)
            else:
                m.r_gain.zero_()
    model.save_pretrained(out)
    for f in plain.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, out / f.name)
    return out, plain


def same_greedy(got: list[int], want: list[int], eos: int = 2) -> bool:
    """vLLM ran with ``ignore_eos``; transformers stops after EOS: compare up to there."""
    if len(want) < len(got):
        return want[-1:] == [eos] and got[: len(want)] == want
    return got == want


def prompts(seed: int = 0, lengths=(5, 17, 40, 75)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def vllm_env(tmp: Path) -> dict:
    import os

    return os.environ | VLLM_ENV | {"VLLM_CACHE_ROOT": str(tmp / "vllm-cache")}


def run_vllm(spec: dict) -> dict:
    """In a fresh process (``python tests/vllm_tiny.py --run SPEC.json``): ``vllm.LLM`` on
    ``spec["model"]`` (fp32, eager, block 32, chunked prefill with ``max_num_batched_tokens``), greedy
    tokens for each batch in ``spec["batches"]`` (run one after the other, so a later batch can hit
    the prefix cache of an earlier one), and ``num_cached_tokens`` per request."""
    import time

    from vllm import LLM, SamplingParams

    import parallax_compile.vllm as pv

    kw = {"hf_overrides": pv.hf_overrides(spec["model"])} if spec.get("parallax", True) else {}
    t = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=True, block_size=32,
              max_model_len=spec.get("max_model_len", 256),
              max_num_batched_tokens=spec.get("max_num_batched_tokens", 64),
              seed=0, **kw)
    result = {"startup_s": time.perf_counter() - t, "batches": []}
    n_tokens = spec["max_tokens"]
    if not isinstance(n_tokens, list):
        n_tokens = [n_tokens] * len(spec["batches"])
    for batch, n in zip(spec["batches"], n_tokens):
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
        result["batches"].append({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "cached": [o.num_cached_tokens or 0 for o in outs],
                                  "seconds": time.perf_counter() - t})
    return result


def main():
    """``python tests/vllm_tiny.py --run SPEC.json`` (see :func:`run_vllm`; writes ``spec["out"]``) or
    ``python tests/vllm_tiny.py FAMILY OUT_DIR [zero|random]`` (writes a converted directory)."""
    import sys

    if sys.argv[1] == "--run":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(spec["out"]).write_text(json.dumps(run_vllm(spec)))
        return
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    write_converted(sys.argv[1], out, probes=sys.argv[3] if len(sys.argv) > 3 else "random")


if __name__ == "__main__":
    main()
