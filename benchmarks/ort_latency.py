"""ONNX Runtime latency (CPU) of a converted model against the original (issue 6).

* ``original``: the unconverted model (softmax attention) exported with the standard exporter
  (``torch.onnx.export(..., dynamo=True)``) at the same opset;
* ``parallax``: the converted model exported with :func:`parallax_compile.export_onnx` (one
  ``ai.parallax::ParallaxAttention`` node per site; stock ONNX Runtime inlines the model-local
  function: two matmuls more per site than softmax attention, and the probe projection);
* ``parallax-double``: the same with the function body computing in double;
* ``parallax-kernel`` (only when onnxruntime-extensions is installed): the parallax file with the
  optional Python kernel (:mod:`parallax_compile.export.ort_kernel`) registered instead of the
  function (run with ``PYTHONPATH`` pointing at an onnxruntime-extensions install to measure it).

The files are run in their own ``InferenceSession`` on the CPU execution provider (default
graph optimisations, ORT's default thread count) on the same inputs: warm-up runs, then
``--repeats`` timed rounds, one run of each file per round (round-robin, so that load from other
processes on a shared machine hits every variant alike); medians and minima are reported, with
the load average at the start. One run of this script; the numbers are what this machine
measured, not asserted. Default: all-MiniLM-L6-v2 at batch 8 x 128 tokens (the issue's target:
parallax within 1.5x of original).

Usage::

    python benchmarks/ort_latency.py                      # minilm, 8 x 128, writes results/ort_latency.json
    python benchmarks/ort_latency.py --model tiny-bert --batch-size 2 --seq-len 16 --repeats 3   # smoke
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _cpu_info() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_sessions(paths: dict[str, Path], inputs: dict, warmup: int, repeats: int, kernel: bool) -> dict:
    """Round-robin timing (one run of each file per round), so load from other processes on a
    shared machine hits every variant alike. Returns per name the median/min times and the output.
    With ``kernel`` (onnxruntime-extensions installed), also ``parallax-kernel``: the parallax
    file with the optional kernel registered instead of the inlined function."""
    from parallax_compile.export.onnx import run_onnx
    from parallax_compile.export.ort_kernel import session

    sessions = {n: session(p, fast_path=False) for n, p in paths.items()}
    if kernel:
        sessions["parallax-kernel"] = session(paths["parallax"], fast_path=True)
        paths = {**paths, "parallax-kernel": paths["parallax"]}
    outs = {}
    for _ in range(warmup):
        for n, s in sessions.items():
            outs[n] = run_onnx(paths[n], inputs, session=s)[0]
    times = {n: [] for n in sessions}
    for _ in range(repeats):
        for n, s in sessions.items():
            t0 = time.perf_counter()
            run_onnx(paths[n], inputs, session=s)
            times[n].append(time.perf_counter() - t0)
    return {n: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
                "times_ms": [round(1e3 * x, 3) for x in t], "output": torch.from_numpy(outs[n])}
            for n, t in times.items()}


def _ortx_version() -> str | None:
    try:
        import onnxruntime_extensions
    except ImportError:
        return None
    return onnxruntime_extensions.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm", help="a parallax_compile.models spec (default minilm)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--opset", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-double", action="store_true", help="skip the double-accumulation variant")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", Path(__file__).parent / "results")))
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    import onnxscript

    import parallax_compile as pc
    from parallax_compile.convert import relative_error, run_conversion
    from parallax_compile.models import load_model

    load_avg = os.getloadavg()
    loaded = load_model(args.model, seq_len=args.seq_len, batch_size=args.batch_size)
    inputs = loaded.example_inputs
    gm, info = run_conversion(loaded.model, inputs, dynamic_dims=loaded.dynamic_dims,
                              valid_positions=loaded.valid_positions)
    with torch.no_grad():
        want = loaded.model(**inputs)[0]
    with tempfile.TemporaryDirectory() as tmp:
        orig = Path(tmp) / "original.onnx"
        dims = {k: ({d: torch.export.Dim.AUTO for d in loaded.dynamic_dims.get(k, {})} or None)
                if isinstance(v, torch.Tensor) else None for k, v in inputs.items()}
        torch.onnx.export(loaded.model, (), str(orig), kwargs=inputs, dynamo=True,
                          opset_version=args.opset, dynamic_shapes=dims, external_data=False)
        variants = {"original": orig, "parallax": pc.export_onnx(gm, path=Path(tmp) / "parallax.onnx", opset=args.opset)}
        if not args.no_double:
            variants["parallax-double"] = pc.export_onnx(gm, path=Path(tmp) / "parallax64.onnx", opset=args.opset,
                                                         accumulate="double")
        from parallax_compile.export.ort_kernel import fast_path_available

        kernel = fast_path_available()
        rows = _time_sessions(variants, inputs, args.warmup, args.repeats, kernel)
        for name, r in rows.items():
            r["max_rel_error_vs_pytorch"] = relative_error(r.pop("output"), want, loaded.valid_positions)
            r["nodes"] = len(onnx.load(str(variants.get(name, variants["parallax"]))).graph.node)
            print(f"{name:16s} median {r['median_ms']:8.2f} ms  min {r['min_ms']:8.2f} ms  "
                  f"rel. error vs PyTorch {r['max_rel_error_vs_pytorch']:.1e}")
    ratio = rows["parallax"]["median_ms"] / rows["original"]["median_ms"]
    ratio_min = rows["parallax"]["min_ms"] / rows["original"]["min_ms"]
    print(f"parallax / original: {ratio:.2f}x (medians), {ratio_min:.2f}x (minima); target <= 1.5x")
    result = {
        "benchmark": "ort_latency",
        "model": args.model,
        "shape": {"batch_size": args.batch_size, "seq_len": int(inputs["input_ids"].shape[1])},
        "opset": args.opset,
        "sites_rewritten": len(info.rewritten),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "results": rows,
        "ratio_parallax_over_original": ratio,
        "ratio_parallax_over_original_min": ratio_min,
        "load_average_at_start": load_avg,
        "target_ratio": 1.5,
        "fast_path_kernel": ("parallax-kernel: onnxruntime-extensions Python op running the PyTorch op"
                             if kernel else "onnxruntime-extensions not installed: not measured"),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "onnxscript": onnxscript.__version__, "parallax_compile": pc.__version__,
                     "onnxruntime_extensions": _ortx_version(),
                     "python": platform.python_version()},
        "cpu": {"model": _cpu_info(), "logical_cores": os.cpu_count(),
                "ort_intra_op_threads": "default"},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "ort_latency.json" if args.model == "minilm" else f"ort_latency_{args.model}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
