"""One-run sweep of the Parallax Triton kernel variants on the GPU (issue 16's training shapes).

For every (variant, shape) cell, most promising variants first and the current default ("base")
first of all: the variant's output and all four gradients (q, k, v, r) are checked on the reduced
shape (``Shape.reduced``: B=1, <= 4 query heads, L <= 1024) against the fp32 ``chunked``
implementation, then the forward (forward variants) or the backward alone from saved forward
outputs (backward variants) is timed at full size with ``bench_attention.bench`` (L2 flushed per
rep). cuDNN SDPA (softmax, half of Parallax's GEMMs) is timed beside each shape, and the bf16 GEMM
ceiling in the same run gives ``frac``. A variant that fails to compile or run is recorded with its
error and the sweep goes on; a cell over ``--budget-s`` is recorded as skipped.

Before timing, ``--jobs`` worker processes compile every (variant, head dim) once on a small shape
with the same specialisation, filling Triton's on-disk cache so that the timed process does not
compile serially.

Output: ``--json`` with the machine, the GEMM ceiling, per shape and variant TFLOP/s fwd / bwd,
``frac`` of the ceiling, errors, cuDNN's figures, and a suggested ``DISPATCH`` table for
``parallax_compile/kernels/triton_parallax.py`` (per shape bucket the variant that is fastest on
the shapes of that bucket, among those that passed the check). A compact table is printed.

Usage (repo root, H200)::

    python benchmarks/sweep_attention.py --json $OUT/sweep_attention.json
    python benchmarks/sweep_attention.py --fwd-variants base tma --bwd-variants base --shapes 0 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_attention as ba  # noqa: E402 - after the path set-up

# issue 16's shapes, all causal
SHAPES = [
    ba._shape(4, 32, 32, 4096, 128, True),
    ba._shape(4, 32, 32, 4096, 64, True),
    ba._shape(8, 32, 8, 2048, 128, True),
    ba._shape(16, 16, 16, 1024, 128, True),
    ba._shape(4, 8, 2, 4096, 256, True),
]
# default sweep order: most promising first (every name is in triton_parallax.FWD_/BWD_VARIANTS)
FWD_ORDER = ["base", "tma", "persistent", "tma-persistent", "tma-ws", "tma-persistent-ws", "heads-first",
             "wide", "split-dv", "tma-split-dv", "ws"]
BWD_ORDER = ["base", "atomic-dq", "wide"]


def _applies(direction: str, variant: str, s: ba.Shape) -> bool:
    return not ("split-dv" in variant and s.d <= 128)


def _bucket(s: ba.Shape) -> str:
    from parallax_compile.kernels import triton_parallax as tp

    return tp.shape_bucket(s.d, s.d, s.lq)


def _set_autotune(tp, mode: str, variant: str) -> None:
    """``mode`` "all": every variant autotunes over its bucket's tiles; "base": only "base" and
    "wide" do, the others run their bucket's first tile; "first": none does."""
    tp.AUTOTUNE = mode == "all" or (mode == "base" and variant in ("base", "wide"))


def _warm(task) -> str:
    """Worker: compile ``variant`` of ``direction`` on ``shape`` (``L`` cut to 256: Triton
    specialises integers only on ``== 1`` and divisibility by 16, so the batch, head counts and GQA
    ratio are kept); fills the on-disk Triton cache."""
    direction, variant, s, mode = task
    from parallax_compile.kernels import triton_parallax as tp

    try:
        _set_autotune(tp, mode, variant)
        q, r, k, v, do = ba._inputs(s, torch.bfloat16)
        fv = variant if direction == "fwd" else "base"
        saved = tp.parallax_fwd(q, r, k, v, None, None, s.causal, None, variant=fv)
        if direction == "bwd":
            tp.parallax_bwd(do, q, r, k, v, *saved, None, None, s.causal, None, False, variant=variant)
        torch.cuda.synchronize()
        return f"{direction} {variant} {s.name}: compiled"
    except Exception as e:  # noqa: BLE001 - the timed process records it again
        msg = str(e).strip().splitlines()
        return f"{direction} {variant} {s.name}: {type(e).__name__}: {(msg[0] if msg else '')[:120]}"


def precompile(fwd: list[str], bwd: list[str], shapes: list[ba.Shape], jobs: int, mode: str) -> None:
    specs = {}
    for s in shapes:
        for t in (s, s.reduced()):
            small = ba.Shape(f"B{t.b}-H{t.hq}:{t.hkv}-L256-D{t.d}", t.b, t.hq, t.hkv, 256, 256, t.d, t.causal)
            key = (t.b == 1, t.b % 16 == 0, t.hq == 1, t.hq % 16 == 0, t.hkv % 16 == 0, t.hq // t.hkv, t.d)
            specs.setdefault(key, (small, s))
    tasks = []
    for small, full in specs.values():
        for direction, names in (("fwd", fwd), ("bwd", bwd)):
            tasks += [(direction, n, small, mode) for n in names if _applies(direction, n, full)]
    if jobs <= 1 or not tasks:
        return
    import multiprocessing as mp

    t0 = time.time()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        for line in ex.map(_warm, tasks):
            print(f"# precompile {line}", flush=True)
    print(f"# precompile: {len(tasks)} tasks in {time.time() - t0:.0f} s", flush=True)


def run_cell(tp, direction: str, variant: str, s: ba.Shape, dtype, rep_ms: float, mode: str) -> dict:
    """Check then time one (direction, variant, shape). Never raises."""
    cell: dict = {"status": "?"}
    _set_autotune(tp, mode, variant)
    try:
        red = s.reduced()
        (q, r, k, v, do), ref = ba.reference(red, dtype)
        fv, bv = (variant, "base") if direction == "fwd" else ("base", variant)
        saved = tp.parallax_fwd(q, r, k, v, None, None, red.causal, red.window, variant=fv)
        grads = tp.parallax_bwd(do, q, r, k, v, *saved, None, None, red.causal, red.window, False, variant=bv)[:4]
        errs = ba.errors(saved[0], grads, ref)
        ok = all(math.isfinite(e) and e <= ba.TOL[dtype] for e in errs.values())
        cell.update(errors=errs, check="ok" if ok else "FAILED")
        del q, r, k, v, do, saved, grads, ref
        q, r, k, v, do = ba._inputs(s, dtype)
        if direction == "fwd":
            fn = lambda: tp.parallax_fwd(q, r, k, v, None, None, s.causal, s.window, variant=variant)
        else:
            saved = tp.parallax_fwd(q, r, k, v, None, None, s.causal, s.window, variant="base")
            fn = lambda: tp.parallax_bwd(do, q, r, k, v, *saved, None, None, s.causal, s.window, False,
                                         variant=variant)
        ms = ba.bench(fn, rep_ms=rep_ms)
        cell.update(status="ok" if ok else "FAILED-correctness", ms=ms, tflops=ba.flops(s, direction, False) / ms / 1e9)
    except Exception as e:  # noqa: BLE001 - a variant that does not compile or run is recorded
        msg = str(e).strip().splitlines()
        cell.update(status="error", error=f"{type(e).__name__}: {(msg[0] if msg else '')[:300]}",
                    trace=traceback.format_exc()[-1500:])
    torch.cuda.empty_cache()
    return cell


def cudnn(s: ba.Shape, dtype, rep_ms: float) -> dict:
    p = ba.make_providers(["sdpa-cudnn"])[0]
    why = p.available(s, dtype)
    if why is not None:
        return {"status": "n/a", "reason": why}
    out = {"status": "ok"}
    for mode in ("fwd", "bwd"):
        try:
            ms = ba.bench(p.make(s, dtype, mode), rep_ms=rep_ms)
            out[mode] = {"ms": ms, "tflops": ba.flops(s, mode, True) / ms / 1e9}
        except Exception as e:  # noqa: BLE001 - recorded
            out[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    torch.cuda.empty_cache()
    return out


def suggest(results: dict, shapes: list[ba.Shape]) -> dict[str, list[str]]:
    """Per DISPATCH bucket: (fwd, bwd) variant with the best geometric-mean speed-up over "base" on
    the bucket's shapes, among variants that passed the check on every one of them."""
    out = {}
    for bucket in sorted({_bucket(s) for s in shapes}):
        names = [s.name for s in shapes if _bucket(s) == bucket]
        pick = []
        for direction in ("fwd", "bwd"):
            best, best_score = "base", 0.0
            variants = set().union(*(results[n][direction].keys() for n in names))
            for v in sorted(variants):
                cells = [results[n][direction].get(v, {}) for n in names]
                bases = [results[n][direction].get("base", {}) for n in names]
                if not all(c.get("status") == "ok" and b.get("status") == "ok" for c, b in zip(cells, bases)):
                    continue
                score = sum(math.log(b["ms"] / c["ms"]) for c, b in zip(cells, bases)) / len(cells)
                if score > best_score + 0.01:  # at least ~1 % faster than base
                    best, best_score = v, score
            pick.append(best)
        out[bucket] = pick
    return out


def print_table(results: dict, shapes: list[ba.Shape], ceiling: float) -> None:
    for direction in ("fwd", "bwd"):
        variants = []
        for s in shapes:
            variants += [v for v in results[s.name][direction] if v not in variants]
        print(f"\n# {direction} TFLOP/s (frac of GEMM {ceiling:.0f}); x = failed check, E = error, - = skipped")
        print(f"{'shape':<26}" + "".join(f"{v:>15}" for v in variants) + f"{'cuDNN':>10}")
        for s in shapes:
            row = f"{s.name:<26}"
            for v in variants:
                c = results[s.name][direction].get(v)
                if c is None or c.get("status") == "skipped":
                    row += f"{'-':>15}"
                elif c.get("status") == "error":
                    row += f"{'E':>15}"
                else:
                    flag = "" if c["status"] == "ok" else "x"
                    row += f"{c['tflops']:>7.0f} ({c['tflops'] / ceiling:.0%}){flag}".rjust(15)
            cd = results[s.name].get("cudnn", {}).get(direction, {})
            row += f"{cd['tflops']:>10.0f}" if "tflops" in cd else f"{'n/a':>10}"
            print(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "sweep_attention.json")
    ap.add_argument("--fwd-variants", nargs="*", default=FWD_ORDER)
    ap.add_argument("--bwd-variants", nargs="*", default=BWD_ORDER)
    ap.add_argument("--shapes", nargs="*", type=int, help="indices into SHAPES (default all)")
    ap.add_argument("--rep-ms", type=float, default=60)
    ap.add_argument("--budget-s", type=float, default=300, help="cells started after this many seconds are skipped")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="precompile processes (1: none)")
    ap.add_argument("--autotune", choices=["base", "all", "first"], default="base",
                    help="which variants autotune over their tile lists (base: only base and wide; the "
                    "others run their bucket's first tile, the tuned best of base)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_attention: needs a CUDA GPU")
        return 2
    from parallax_compile.kernels import triton_parallax as tp

    for n in args.fwd_variants:
        tp.resolve_variant(n, "fwd", 128, 128, 1)  # unknown names fail here, before any GPU time
    for n in args.bwd_variants:
        tp.resolve_variant(n, "bwd", 128, 128, 1)
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    dtype = torch.bfloat16
    t0 = time.time()
    info = ba.machine()
    print(f"# {info['gpu']} ({info['sm_count']} SMs), torch {info['torch']}, CUDA {info['cuda']}, triton {info['triton']}",
          flush=True)
    precompile(args.fwd_variants, args.bwd_variants, shapes, args.jobs, args.autotune)
    ceiling = ba.gemm_ceiling()
    info["gemm_bf16_8192_tflops"] = round(ceiling, 1)
    print(f"# bf16 GEMM ceiling {ceiling:.0f} TFLOP/s; t={time.time() - t0:.0f}s", flush=True)

    results = {s.name: {"shape": asdict(s), "bucket": _bucket(s), "fwd": {}, "bwd": {}} for s in shapes}
    for s in shapes:
        results[s.name]["cudnn"] = cudnn(s, dtype, args.rep_ms)
    # variants outer, shapes inner: when the budget runs out, every shape has its base figures
    cells = [("fwd", v) for v in args.fwd_variants[:1]] + [("bwd", v) for v in args.bwd_variants[:1]]
    rest_f, rest_b = list(args.fwd_variants[1:]), list(args.bwd_variants[1:])
    while rest_f or rest_b:  # interleave, two forward variants per backward one
        for _ in range(2):
            if rest_f:
                cells.append(("fwd", rest_f.pop(0)))
        if rest_b:
            cells.append(("bwd", rest_b.pop(0)))
    for direction, variant in cells:
        for s in shapes:
            if not _applies(direction, variant, s):
                continue
            if time.time() - t0 > args.budget_s:
                cell = {"status": "skipped", "reason": f"time budget {args.budget_s:.0f} s"}
            else:
                cell = run_cell(tp, direction, variant, s, dtype, args.rep_ms, args.autotune)
                if "tflops" in cell:
                    cell["frac_ceiling"] = cell["tflops"] / ceiling
            results[s.name][direction][variant] = cell
            tf = f"{cell['tflops']:.0f} TF/s" if "tflops" in cell else cell.get("error", cell.get("reason", ""))
            print(f"{direction} {variant:<15} {s.name:<26} {cell['status']:<18} {tf} "
                  f"{' '.join(f'{k}={e:.1e}' for k, e in cell.get('errors', {}).items())} t={time.time() - t0:.0f}s",
                  flush=True)
        _write(args.json, info, results, shapes)
    print_table(results, shapes, ceiling)
    sug = _write(args.json, info, results, shapes)
    print("\n# suggested DISPATCH (bucket: (fwd, bwd)):")
    for b, (f, bw) in sug.items():
        print(f'    "{b}": ("{f}", "{bw}"),')
    print(f"# wrote {args.json} in {time.time() - t0:.0f} s")
    return 0


def _write(path: Path, info: dict, results: dict, shapes) -> dict:
    sug = suggest(results, shapes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "results": results, "suggested_dispatch": sug}, indent=2))
    return sug


if __name__ == "__main__":
    raise SystemExit(main())
