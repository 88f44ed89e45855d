"""Gemma 3 270M served by vLLM on the CPU: converted (Parallax, random probes) vs unconverted.

1. Correctness: greedy tokens of ``vllm.LLM`` on the converted directory (``--probes zero``, the
   default: a freshly converted model; ``random``: random ``W_R``, noise text) equal transformers'
   ``generate`` (``parallax_compile.hf.from_pretrained``) for 3 prompts, one of them longer than the
   512-token sliding window.
2. Throughput: output tokens/s of ``vllm.LLM.generate`` for 8 prompts x 64 new tokens (after a
   warm-up batch), converted vs unconverted (vLLM's own ``CPU_ATTN``), fp32, eager, one process each.

Run in the vLLM venv (README 'Serving with vLLM'):
``VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/vllm_gemma3.py --out
benchmarks/results/vllm_gemma3_270m_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import vllm_tiny as vt


def run(work: Path, spec: dict) -> dict:
    spec = {**spec, "out": str(work / "result.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_tiny.py"), "--run", str(work / "spec.json")],
                   cwd=ROOT, env=vt.vllm_env(work) | {"PYTHONPATH": str(ROOT)}, check=True)
    return json.loads((work / "result.json").read_text())


def check_prompts(tokenizer) -> list[list[int]]:
    long = " ".join(["The history of the printing press begins with movable type in East Asia"] * 50)
    texts = ["The capital of France is", "Write a short poem about the sea:\n", long]
    return [tokenizer.encode(t) for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--probes", choices=["zero", "random"], default="zero")
    args = ap.parse_args()
    import torch
    import transformers
    import vllm

    work = args.work or Path(tempfile.mkdtemp(prefix="vllm-gemma3-"))
    conv, plain = vt.write_converted_gemma3_270m(work / f"converted-{args.probes}", probes=args.probes)
    tok = transformers.AutoTokenizer.from_pretrained(plain)
    check = check_prompts(tok)
    bench = [tok.encode(f"Story number {i}: once upon a time") for i in range(8)]
    common = {"max_model_len": 1024, "max_num_batched_tokens": 256,
              "max_tokens": [args.max_new_tokens, 64, 64]}
    res_conv = run(work, {**common, "model": str(conv), "batches": [check, bench, bench]})
    res_plain = run(work, {**common, "model": str(plain), "parallax": False,
                           "batches": [check, bench, bench]})
    want = vt.hf_greedy(conv, check, args.max_new_tokens)
    got = res_conv["batches"][0]["tokens"]
    equal = [vt.same_greedy(a, b, eos=tok.eos_token_id) for a, b in zip(got, want)]
    n_out = 8 * 64
    result = {
        "benchmark": "vllm_gemma3_270m_cpu",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__, "vllm": vllm.__version__,
                    "transformers": transformers.__version__},
        "settings": {"probes": args.probes, "dtype": "float32", "enforce_eager": True, "block_size": 32,
                     "max_num_batched_tokens": 256,
                     "prompts": 8, "new_tokens_per_prompt": 64, "VLLM_CPU_KVCACHE_SPACE": "1"},
        "check": {"prompt_lengths": [len(p) for p in check], "max_new_tokens": args.max_new_tokens,
                  "equal_to_transformers": equal, "vllm_text": [tok.decode(t) for t in got],
                  "transformers_text": [tok.decode(t) for t in want]},
        "converted": {"startup_s": res_conv["startup_s"], "seconds": res_conv["batches"][2]["seconds"],
                      "output_tokens_per_s": n_out / res_conv["batches"][2]["seconds"]},
        "unconverted": {"startup_s": res_plain["startup_s"], "seconds": res_plain["batches"][2]["seconds"],
                        "output_tokens_per_s": n_out / res_plain["batches"][2]["seconds"]},
    }
    result["converted_over_unconverted"] = (result["converted"]["output_tokens_per_s"]
                                            / result["unconverted"]["output_tokens_per_s"])
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not all(equal):
        sys.exit(1)


if __name__ == "__main__":
    main()
