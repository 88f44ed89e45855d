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
    convert`` writes it) and a tokenizer. ``probes``: ``"zero"`` or ``"random"`` (random ``W_R`` on every
    layer and a
    random per-head ``r_gain`` in the checkpoint, one head's gain 0, layer 0's ``W_R`` zero)."""
    import transformers

    from parallax_compile import hf

    cfg = tiny_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa",
                                                              dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    info = hf.upgrade(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    owners = _probe_layers(model)
    gains = {}
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i, m in enumerate(owners):
            w = m.r_proj.weight
            if probes == "random" and i > 0:
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)
            hq = w.shape[0] // HEAD_DIM
            gain = torch.rand(hq, generator=g) * 1.5 + 0.25
            gain[0] = 0.0
            gains[i] = gain if probes == "random" else None
    has_gain = all(hasattr(m, "r_gain") for m in owners)
    hf.save_hf(model, info, out)  # as `parallax-compile convert`: save_pretrained + report + reference
    word_tokenizer().save_pretrained(out)
    if probes == "random":
        _write_gains(model, owners, gains, out, has_gain, family)
    return out


def _write_gains(model, owners, gains, out, has_gain, family):
    """Put ``r_gain`` in the checkpoint. Where transformers' model has no ``r_gain`` yet (before
    issue 12), only a linear chain (Llama: no per-head norm) lets the reference fold the gain into
    ``W_R``: there the checkpoint keeps ``W_R`` and ``r_gain`` and the reference directory (same
    folder, ``reference/``) gets ``r_gain * W_R``; other families keep no gain (gain 1)."""
    from safetensors.torch import load_file, save_file

    names = {id(m): n for n, m in model.named_modules()}
    path = out / "model.safetensors"
    sd = load_file(path)
    if has_gain:
        for i, m in enumerate(owners):
            sd[f"{names[id(m)]}.r_gain"] = gains[i].contiguous()
        save_file(sd, path, metadata={"format": "pt"})
        return
    if family not in ("llama", "mistral"):
        return
    ref = dict(sd)
    for i, m in enumerate(owners):
        name = names[id(m)]
        w = sd[f"{name}.r_proj.weight"]
        sd[f"{name}.r_gain"] = gains[i].contiguous()
        folded = w.view(-1, HEAD_DIM, w.shape[-1]) * gains[i][:, None, None]
        ref[f"{name}.r_proj.weight"] = folded.reshape(w.shape)
    save_file(sd, path, metadata={"format": "pt"})
    refdir = out / "reference"
    refdir.mkdir()
    for f in out.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (refdir / f.name).write_bytes(f.read_bytes())
    save_file(ref, refdir / "model.safetensors", metadata={"format": "pt"})


def reference_dir(path: Path) -> Path:
    return path / "reference" if (path / "reference").is_dir() else path


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int, *,
              zero_probes: bool = False) -> list[list[int]]:
    """transformers' greedy tokens for each prompt (one at a time, no padding), from the converted
    directory (``parallax_compile.hf.from_pretrained``); stops at EOS. ``zero_probes``: with every
    ``W_R`` set to 0 (softmax attention), to show that the probes change the tokens."""
    from parallax_compile import hf

    model = hf.from_pretrained(reference_dir(path), dtype=torch.float32).eval()
    if zero_probes:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "r_proj" in name:
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
    ``W_R`` zero or random (W_Q's std; through the q-norm that makes ``r`` as large as ``q`` and the
    text noise), saved with ``save_pretrained`` plus the tokenizer, into ``out``.
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
        for m in _probe_layers(model) if probes == "random" else []:
            m.r_proj.weight.copy_(torch.randn(m.r_proj.weight.shape, generator=g) * m.q_proj.weight.std())
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
