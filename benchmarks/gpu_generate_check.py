"""GPU check: a converted Hugging Face causal LM generates token for token like the original.

Greedy generation of ``--new-tokens`` (default 64) tokens with the unconverted model (``sdpa``)
and with the upgraded one (``parallax_compile.hf.upgrade``, ``W_R = 0``; decode steps through the
split-KV Triton kernel) on CUDA, fp32, for one unpadded prompt (the kvcache entry point) and a
left-padded batch (the op with transformers' mask). Writes ``$OUT/gpu_generate_check.json``.

Models: ``--model-dir DIR`` (a Hugging Face directory, e.g. Gemma 3 270M's cache folder
``~/.cache/parallax-compile/gemma3-270m`` copied over), ``--gguf FILE`` (a GGUF file such as the
245 MB ``gemma-3-270m`` Q4_K_M one, reassembled from chunks: needs the ``gguf`` package), and
always the tiny random Llama / Qwen3 / Mistral / Gemma 3 models. Without transformers the script
writes a JSON that says so and exits 0.

    PYTHONPATH=$PWD python benchmarks/gpu_generate_check.py [--model-dir DIR | --gguf FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _check(name, model, example_inputs, prompt_ids, device, new_tokens) -> dict:
    from parallax_compile import hf

    t0 = time.perf_counter()
    original = copy.deepcopy(model).to(device)
    info = hf.upgrade(model, example_inputs)  # on the CPU: export + verification
    model = model.to(device)
    kw = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    lengths = [prompt_ids.shape[1], max(1, prompt_ids.shape[1] // 2)]
    ids = prompt_ids.repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, : lengths[0] - lengths[1]] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = {"model": name, "sites_rewritten": len(info.rewritten), "max_output_error_cpu": info.max_output_error}
    for label, (i, m) in {"unpadded": (ids[:1], mask[:1]), "left_padded_batch": (ids, mask)}.items():
        i, m = i.to(device), m.to(device)
        with torch.no_grad():
            want = original.generate(input_ids=i, attention_mask=m, **kw)
            got = model.generate(input_ids=i, attention_mask=m, **kw)
        same = bool(torch.equal(want, got))
        first = None if same else int((want != got).nonzero()[0, 1]) - i.shape[1]
        out[label] = {"identical": same, "new_tokens": int(got.shape[1] - i.shape[1]), "first_difference": first}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": "float32", "results": []}
    try:
        import transformers

        doc["transformers"] = transformers.__version__
    except ImportError:
        doc["skipped"] = "transformers is not installed on this machine"
        (out_dir / "gpu_generate_check.json").write_text(json.dumps(doc, indent=1))
        print(doc["skipped"])
        return
    from parallax_compile.models import load_model

    for family in ("llama", "qwen3", "mistral", "gemma3"):
        loaded = load_model(f"tiny-{family}", seq_len=12)
        prompt = loaded.example_inputs["input_ids"][:1]
        try:
            doc["results"].append(_check(f"tiny-{family}", loaded.model, loaded.example_inputs, prompt, device,
                                         args.new_tokens))
        except Exception as e:  # noqa: BLE001 - record and go on
            doc["results"].append({"model": f"tiny-{family}", "error": f"{type(e).__name__}: {e}"})
        print(doc["results"][-1], flush=True)
    if args.model_dir or args.gguf:
        kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}
        if args.gguf:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name,
                                                                      **kwargs)
            name = args.gguf.name
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs)
            name = str(args.model_dir)
        model.eval()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        example = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
                   "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "use_cache": False}
        try:
            doc["results"].append(_check(name, model, example, ids[:1, :12], device, args.new_tokens))
        except Exception as e:  # noqa: BLE001
            doc["results"].append({"model": name, "error": f"{type(e).__name__}: {e}"})
        print(doc["results"][-1], flush=True)
    doc["all_identical"] = all(r.get("unpadded", {}).get("identical") and r.get("left_padded_batch", {}).get("identical")
                               for r in doc["results"])
    (out_dir / "gpu_generate_check.json").write_text(json.dumps(doc, indent=1))
    print(f"all identical: {doc['all_identical']}; wrote {out_dir / 'gpu_generate_check.json'}")


if __name__ == "__main__":
    main()
