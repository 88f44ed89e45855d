"""LLA (solve and conjugate gradient) vs the converted Parallax forward, at the same shapes.

For each named shape: the LLA layer as models write it (:func:`parallax_compile.models.lla.lla_core`:
per-query ``C_kk + lambda I`` solved with ``torch.linalg.solve``, or by a fixed-iteration CG loop
with FlashLLA's iteration cap of 32 -- FlashLLA stops earlier at its tolerance), in fp32 (LLA is
unstable in low precision), against ``torch.ops.parallax.attention`` (fp32, and bf16 on CUDA: the
Triton kernel). Forward time (median), peak memory, and the speed ratio. LLA's own accuracy is
reported against the float64 reference on the smaller shapes.

Then the quality side: the built-in ``lla`` model converted with a probe calibrated on real text
(:mod:`parallax_compile.calibrate`): per-site held-out error of the layer output, and the model's
output error, calibrated vs ``W_R = 0``.

    python benchmarks/bench_lla.py            # CUDA if available (named GPU shapes), else the CPU shape
    python benchmarks/bench_lla.py --smoke    # one tiny shape, CPU

Writes ``$OUT/bench_lla[_cpu|_smoke].json`` (default ``OUT=benchmarks/results``) with the machine,
versions and date. Never asserts timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from parallax_compile.models.lla import lla_core
from parallax_compile.reference import allowed_keys, lla_attention_ref

SHAPES = {
    "smoke": [{"name": "smoke", "B": 1, "Hq": 2, "Hkv": 1, "L": 64, "D": 16}],
    "cpu": [{"name": "cpu-L256-D16", "B": 1, "Hq": 4, "Hkv": 2, "L": 256, "D": 16},
            {"name": "cpu-L512-D32", "B": 1, "Hq": 4, "Hkv": 2, "L": 512, "D": 32}],
    "gpu": [{"name": f"gpu-L{L}-D64", "B": 2, "Hq": 8, "Hkv": 4, "L": L, "D": 64} for L in (1024, 4096)],
}
CG_ITERS = 32  # FlashLLA's cg_max_iters default
RIDGE = 0.5


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> dict:
    fn()  # warm-up (and Triton compile)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"ms": 1e3 * statistics.median(times)}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def bench_shape(s: dict, device, reps: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    b, hq, hkv, n, d = s["B"], s["Hq"], s["Hkv"], s["L"], s["D"]
    q = torch.randn(b, hq, n, d, generator=g).to(device)
    k, v = (torch.randn(b, hkv, n, d, generator=g).to(device) for _ in range(2))
    r = 0.1 * torch.randn(b, hq, n, d, generator=g).to(device)
    keep = allowed_keys(n, n, causal=True, device=device)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    row = dict(s)
    with torch.no_grad():
        row["lla_solve"] = timed(lambda: lla_core(q, kr, vr, ridge=RIDGE, solver="solve", keep=keep), device, reps)
        row["lla_cg"] = timed(lambda: lla_core(q, kr, vr, ridge=RIDGE, solver="cg", cg_iters=CG_ITERS, keep=keep),
                              device, reps)
        row["cg_iters"] = CG_ITERS
        row["parallax_fp32"] = timed(lambda: torch.ops.parallax.attention(q, r, k, v, None, None, True, None),
                                     device, reps)
        if device.type == "cuda":
            qh, rh, kh, vh = (t.bfloat16() for t in (q, r, k, v))
            row["parallax_bf16"] = timed(lambda: torch.ops.parallax.attention(qh, rh, kh, vh, None, None, True, None),
                                         device, reps)
        for name in ("lla_solve", "lla_cg"):
            for p in ("parallax_fp32", "parallax_bf16"):
                if p in row:
                    row[f"speedup_{p}_vs_{name}"] = row[name]["ms"] / row[p]["ms"]
        # The float64 oracle materialises [B, H, L, L, D + 1] several times: smaller shapes only.
        if n <= (1024 if device.type == "cuda" else 512):
            ref = lla_attention_ref(q.double(), k.double(), v.double(), ridge=RIDGE, attn_mask=keep)
            for name, solver in (("lla_solve", "solve"), ("lla_cg", "cg")):
                out = lla_core(q, kr, vr, ridge=RIDGE, solver=solver, cg_iters=CG_ITERS, keep=keep).double()
                row[name]["rel_rms_error_vs_float64_lla"] = ((out - ref).norm() / ref.norm()).item()
            del ref
    print(json.dumps(row))
    return row


def conversion_quality(n_tokens: int) -> dict:
    """Convert the built-in ``lla`` model with a calibrated probe (CPU) and report the fit."""
    from parallax_compile.calibrate import text_calibration
    from parallax_compile.convert import run_conversion
    from parallax_compile.models import load_model

    loaded = load_model("lla", seq_len=64, batch_size=4)
    t0 = time.perf_counter()
    _, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                             calibration=text_calibration(loaded.example_inputs, n_tokens=n_tokens))
    return {
        "model": loaded.description,
        "calibration_tokens": n_tokens,
        "seconds": time.perf_counter() - t0,
        "sites": [{k: s.as_dict()[k] for k in ("module_path", "form", "ridge", "cg_iterations", "fit")}
                  for s in info.sites],
        "model_output_rel_rms_error": {"calibrated": info.lla_output_error, "zero": info.lla_output_error_zero},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    kind = "smoke" if args.smoke else ("gpu" if device.type == "cuda" else "cpu")
    reps = args.reps or (2 if kind == "smoke" else 5 if kind == "cpu" else 10)
    torch.backends.cuda.matmul.allow_tf32 = False
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu"),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "ridge": RIDGE,
        "note": "forward only, no autograd; LLA fp32 (eager PyTorch: the form the passes convert), "
                "Parallax through torch.ops.parallax.attention; causal; median of reps",
        "shapes": [],
    }
    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_lla{'' if kind == 'gpu' else '_' + kind}.json"
    for s in SHAPES[kind]:
        result["shapes"].append(bench_shape(s, device, reps))
        path.write_text(json.dumps(result, indent=2))
    result["conversion"] = conversion_quality(1024 if kind == "smoke" else 8192)
    print(json.dumps(result["conversion"]["model_output_rel_rms_error"]))
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


if __name__ == "__main__":
    main()
