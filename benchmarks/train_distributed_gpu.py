"""One-GPU run of ``examples/train_distributed.py`` (issue 17): the upgraded Gemma 3 270M fine-tuned
under ``torchrun --nproc_per_node 1`` with NCCL and FSDP2 (bf16 ``MixedPrecisionPolicy``), against the
plain single-GPU loop (``--strategy none``, bf16 autocast) with the same data, seed and steps.

    python benchmarks/train_distributed_gpu.py                 # H200: ~3 minutes; JSON to $OUT
    python benchmarks/train_distributed_gpu.py --steps 50      # shorter

Steps: (1) FSDP2 run on ``--model gemma3-270m`` (rank 0 upgrades it and saves the conversion to
``WORK/fsdp/base``; a DCP checkpoint at the end, written back as a conversion directory and
checked with ``parallax-compile verify``); (2) the plain loop on that conversion directory. Each
run reports median tokens/s (after ``--warmup`` steps) and peak ``torch.cuda.max_memory_allocated``.
Writes ``train_distributed_gpu.json`` (and each run's JSON and log) to ``$OUT`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_distributed.py"


def run(cmd: list[str], log: Path, timeout: float) -> float:
    """Run ``cmd`` from the repository root with its output in ``log``; return the wall seconds.
    Raises ``RuntimeError`` with the log's tail when it fails."""
    t0 = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with log.open("w") as fh:
        res = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"exit {res.returncode}: {' '.join(cmd)}\n" + "".join(log.read_text().splitlines(True)[-40:]))
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    p.add_argument("--no-verify", action="store_true", help="skip `parallax-compile verify` of the export (~30 s, CPU)")
    p.add_argument("--work", type=Path, help="checkpoints and the conversion (default: a temporary directory)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="train_distributed_"))
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
              "--warmup", str(args.warmup), "--train", "all", "--bf16"]
    fsdp_json, plain_json = args.out / "train_distributed_fsdp.json", args.out / "train_distributed_plain.json"
    export = work / "fsdp_export"
    walls = {}
    walls["fsdp"] = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                         str(SCRIPT), "--model", args.model, "--strategy", "fsdp", *common,
                         "--ckpt-dir", str(work / "fsdp"), "--export", str(export), "--json", str(fsdp_json)],
                        args.out / "train_distributed_fsdp.log", timeout=420)
    base = work / "fsdp" / "base" if not Path(args.model).is_dir() else Path(args.model)
    walls["plain"] = run([sys.executable, str(SCRIPT), "--model", str(base), "--strategy", "none", *common,
                          "--json", str(plain_json)], args.out / "train_distributed_plain.log", timeout=420)
    if not args.no_verify:
        walls["verify"] = run([sys.executable, "-m", "parallax_compile.cli", "verify", str(export)],
                              args.out / "train_distributed_verify.log", timeout=300)
    fsdp, plain = json.loads(fsdp_json.read_text()), json.loads(plain_json.read_text())
    import torch
    import transformers

    fsdp_peak, plain_peak = fsdp["peak_memory_bytes_per_rank"][0], plain["peak_memory_bytes_per_rank"][0]
    summary = {
        "what": "Gemma 3 270M upgraded to Parallax, fine-tuned (all weights) under torchrun --nproc_per_node 1, "
                "NCCL, FSDP2 bf16 MixedPrecisionPolicy vs the plain single-GPU loop with bf16 autocast",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"gpu": fsdp["device"], "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version()},
        "config": {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "warmup_steps_excluded": args.warmup},
        "fsdp": {k: fsdp[k] for k in ("tokens_per_s", "median_step_s", "peak_memory_bytes_per_rank")},
        "plain": {k: plain[k] for k in ("tokens_per_s", "median_step_s", "peak_memory_bytes_per_rank")},
        "fsdp_over_plain_tokens_per_s": fsdp["tokens_per_s"] / plain["tokens_per_s"],
        "fsdp_over_plain_peak_memory": (fsdp_peak / plain_peak) if fsdp_peak and plain_peak else None,  # None: CPU
        "loss_first_last": {"fsdp": [fsdp["losses"][0], fsdp["losses"][-1]],
                            "plain": [plain["losses"][0], plain["losses"][-1]]},
        "verify_export": "skipped" if args.no_verify else "ok (train_distributed_verify.log)",
        "wall_s": walls,
    }
    (args.out / "train_distributed_gpu.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
