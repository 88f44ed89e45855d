"""Decode benchmark (GPU): Parallax decode with a KV cache vs fla's Parallax decode vs softmax SDPA.

One query token per sequence (``Lq = 1``) against a full bf16 cache of ``L`` tokens; every method is
checked against the oracles of ``parallax_compile.reference`` run in fp32 (Parallax; softmax for
SDPA) on the first rows of the batch **before** it is timed, and a
method that fails the check is reported as such and not timed.

Methods:

* ``parallax`` -- :func:`parallax_compile.parallax_attention_with_kvcache` (split-KV Triton kernel,
  stacked ``[q; r]`` tile, merge launch when split); ``parallax_unstacked`` -- the same kernel
  with two GEMMs per product (``DecodeVariant(mode="unstack")``), on a subset;
* ``fla_decode_one_step`` -- ``fla.ops.parallax.decode.parallax_decode_one_step`` (fla-core; layout
  ``[B, T, H, D]``, its cache copied once to that layout, outside the timing);
* ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient`` -- ``scaled_dot_product_attention`` with a
  one-token query (GQA packed: the ``G`` query heads of a KV head as ``G`` query rows, as transformers'
  decode path does), one backend forced each: softmax baselines.

Timing: CUDA-graph replay. ``warm``: a graph of ``REPS`` back-to-back calls, replayed, time / REPS
(the cache stays in L2 when it fits: 60 MB on an H200). ``flushed``: a graph of one call; before
each replay a 512 MB buffer is overwritten (outside the timed events), so the cache is read from
HBM. Median of the repetitions. Effective bandwidth = K and V bytes of the cache
(``2 * B * Hkv * L * D * 2``) / time, against the measured 4.3 TB/s copy ceiling (SPEC section 6).

Grid (trimmed to stay under ~4 minutes; the JSON records what was skipped and why): D=128:
B in {1, 8, 32, 64} x (Hq, Hkv) in {(8,8), (32,8), (32,32)} x L in {512, 4k, 16k, 32k, 128k},
configurations whose cache exceeds ``--max-cache-gb`` skipped; fla only where ``B * Hq * L``
stays small enough for its one-program-per-head kernel to finish quickly; D=256: B in {1, 32},
(8,8) and (32,8), L in {4k, 32k}.

Usage (GPU): ``PYTHONPATH=/tmp/site:$PWD python benchmarks/bench_decode.py`` -> ``$OUT/bench_decode.json``
(default ``benchmarks/results/``). ``--smoke`` runs a tiny grid (also on the CPU, through the
portable path, without timing claims).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallax_compile import parallax_attention_with_kvcache
from parallax_compile.reference import parallax_attention_ref, softmax_attention_ref

HBM_TBPS = 4.3
REPS = 10
TARGETS = [
    # (name, B, Hq, Hkv, L, D, timing, metric, bound)
    ("B=32 Hq=32 Hkv=8 L=16k: >= 3.9 TB/s (flushed)", 32, 32, 8, 16384, 128, "flushed", "tbps", 3.9),
    ("B=1 H=8 L=128k: >= 3.5 TB/s (flushed)", 1, 8, 8, 131072, 128, "flushed", "tbps", 3.5),
    ("B=1 H=8 L=16k: <= 18 us (CUDA graph, warm)", 1, 8, 8, 16384, 128, "warm", "us", 18.0),
]


def _machine() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "sm_count": p.multi_processor_count, "memory_gb": round(p.total_memory / 2**30, 1)}
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "unknown")
    except ImportError:
        info["fla"] = None
    return info


def _fla_decode():
    try:
        from fla.ops.parallax.decode import parallax_decode_one_step
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    return parallax_decode_one_step, None


def reference(q, r, k, v, scale, rows):
    """fp32 oracle for the first ``rows`` sequences, ``[rows, Hq, 1, Dv]``: SPEC section 2 through
    :mod:`parallax_compile.reference` (``r = None``: softmax)."""
    q, k, v = q[:rows].float(), k[:rows].float(), v[:rows].float()
    if r is None:
        return softmax_attention_ref(q, k, v, scale=scale)
    return parallax_attention_ref(q, r[:rows].float(), k, v, scale=scale)


def kv_bytes(b: int, hkv: int, l: int, d: int, dv: int, item: int) -> int:
    """Bytes of the K and V cache a decode step reads: ``B * Hkv * L * (D + Dv) * item``."""
    return b * hkv * l * (d + dv) * item


def _rel(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


def _time_graph(fn, timing: str, flush_buf) -> float:
    """Median microseconds per call of ``fn`` under CUDA-graph replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    n = REPS if timing == "warm" else 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7 if timing == "warm" else 15):
        if timing == "flushed":
            flush_buf.add_(1)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / n)
    return statistics.median(times)


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]

    def call(q, k, v, scale):
        # GQA packed as in transformers' decode path: the G query heads of a KV head become G query
        # rows ([B, Hkv, G, D], no mask), so every backend reads each K/V head once.
        b, hq, _, d = q.shape
        with sdpa_kernel([backend]):
            o = torch.nn.functional.scaled_dot_product_attention(q.view(b, k.shape[1], hq // k.shape[1], d), k, v,
                                                                 scale=scale)
        return o.reshape(b, hq, 1, d)

    return call


def run_config(b, hq, hkv, l, d, *, methods, timings, device, dtype, flush_buf, fla_fn):
    gen = torch.Generator(device=device).manual_seed(b * 7 + l + d)
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=gen)
    r = (torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=gen) * d**-0.5).to(dtype)
    k = torch.randn(b, hkv, l, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, l, d, device=device, dtype=dtype, generator=gen)
    seqlens = torch.full((b,), l, dtype=torch.int32, device=device)
    scale = d**-0.5
    n_bytes = kv_bytes(b, hkv, l, d, d, k.element_size())
    rows = min(b, 2)
    ref_px = reference(q, r, k, v, scale, rows)
    ref_sm = None
    out = {"B": b, "Hq": hq, "Hkv": hkv, "L": l, "D": d, "kv_bytes": n_bytes, "methods": {}}
    for name in methods:
        res = {}
        try:
            if name == "parallax":
                def fn(q=q, r=r, k=k, v=v):
                    return parallax_attention_with_kvcache(q, r, k, v, cache_seqlens=seqlens, scale=scale)

                res["error"] = _rel(fn()[:rows], ref_px)
                ok = res["error"] <= 2e-2
            elif name == "parallax_unstacked":
                from parallax_compile.kernels import triton_decode as td

                unstacked = td.DecodeVariant(mode="unstack")

                def fn(q=q, r=r, k=k, v=v, unstacked=unstacked):
                    return td.parallax_decode(q, r, k, v, seqlens, None, scale, None, variant=unstacked)

                res["error"] = _rel(fn()[:rows], ref_px)
                ok = res["error"] <= 2e-2
            elif name == "fla_decode_one_step":
                qf, rf = q.transpose(1, 2).contiguous(), r.transpose(1, 2).contiguous()
                kf, vf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()

                def fn(qf=qf, rf=rf, kf=kf, vf=vf):
                    return fla_fn(qf, rf, kf, vf, scale=scale)

                res["error"] = _rel(fn().transpose(1, 2)[:rows], ref_px)
                ok = res["error"] <= 2e-2
            else:
                call = _sdpa(name.split("_", 1)[1])

                def fn(q=q, k=k, v=v, call=call):
                    return call(q, k, v, scale)

                if ref_sm is None:
                    ref_sm = reference(q, None, k, v, scale, rows)
                res["error"] = _rel(fn()[:rows], ref_sm)
                ok = res["error"] <= 2e-2
            if not ok:
                res["status"] = "failed the correctness check; not timed"
            elif device == "cuda":
                for t in timings:
                    us = _time_graph(fn, t, flush_buf)
                    res[t] = {"us": round(us, 2), "tbps": round(n_bytes / (us * 1e-6) / 1e12, 3),
                              "frac_hbm": round(n_bytes / (us * 1e-6) / 1e12 / HBM_TBPS, 3)}
                res["status"] = "ok"
            else:
                res["status"] = "checked (no timing without CUDA)"
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            res = {"status": f"not available: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        out["methods"][name] = res
    if "fla_decode_one_step" in methods:
        torch.cuda.empty_cache() if device == "cuda" else None
    return out


def grid(smoke: bool, max_cache_gb: float):
    if smoke:
        return [(2, 4, 2, 300, 64), (1, 8, 8, 1000, 128)], []
    cfgs, skipped = [], []
    for d, bs, heads, ls in (
        (128, (1, 8, 32, 64), ((8, 8), (32, 8), (32, 32)), (512, 4096, 16384, 32768, 131072)),
        (256, (1, 32), ((8, 8), (32, 8)), (4096, 32768)),
    ):
        for b in bs:
            for hq, hkv in heads:
                for l in ls:
                    gb = 2 * b * hkv * l * d * 2 / 1e9
                    if gb > max_cache_gb:
                        skipped.append({"B": b, "Hq": hq, "Hkv": hkv, "L": l, "D": d,
                                        "why": f"K+V cache {gb:.0f} GB > --max-cache-gb {max_cache_gb}"})
                    else:
                        cfgs.append((b, hq, hkv, l, d))
    # the configurations the targets name first, so the time budget never cuts them
    first = [(t[1], t[2], t[3], t[4], t[5]) for t in TARGETS] + [(1, 8, 8, 16384, 128), (1, 32, 8, 16384, 128)]
    cfgs = [c for c in first if c in cfgs] + [c for c in cfgs if c not in first]
    return cfgs, skipped


def _fla_ok(b, hq, l) -> bool:
    # fla's one-step kernel runs one program per (sequence, head) over the whole cache: ~0.1 TB/s at
    # B=1; keep its calls under a few ms each.
    return b * hq * l <= 32 * 32 * 16384 and b <= 32


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny grid, a few seconds (CPU or GPU)")
    ap.add_argument("--max-cache-gb", type=float, default=36.0)
    ap.add_argument("--budget-s", type=float, default=210.0, help="stop starting new configurations after this")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    fla_fn, fla_why = _fla_decode() if device == "cuda" else (None, "needs CUDA")
    flush_buf = torch.empty(512 * 2**20 // 4, dtype=torch.float32, device=device) if device == "cuda" else None
    cfgs, skipped = grid(args.smoke, args.max_cache_gb)
    timings = ("warm", "flushed")
    results, t0 = [], time.perf_counter()
    for i, (b, hq, hkv, l, d) in enumerate(cfgs):
        if time.perf_counter() - t0 > args.budget_s:
            skipped += [{"B": c[0], "Hq": c[1], "Hkv": c[2], "L": c[3], "D": c[4], "why": "time budget"}
                        for c in cfgs[i:]]
            break
        methods = ["parallax"]
        if d == 128 and l in (16384, 131072) and b in (1, 32):
            methods.append("parallax_unstacked")
        if fla_fn is not None and _fla_ok(b, hq, l):
            methods.append("fla_decode_one_step")
        methods += ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient"]
        row = run_config(b, hq, hkv, l, d, methods=methods, timings=timings, device=device, dtype=dtype,
                         flush_buf=flush_buf, fla_fn=fla_fn)
        results.append(row)
        px = row["methods"]["parallax"]
        brief = {m: (v.get("flushed", {}).get("us"), v.get("warm", {}).get("us"), v.get("status"))
                 for m, v in row["methods"].items()}
        print(f"B={b} Hq={hq} Hkv={hkv} L={l} D={d}: err {px.get('error')} {brief}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        partial = {"machine": _machine(), "partial": True, "results": results, "skipped": skipped}
        (out_dir / ("bench_decode_smoke.json" if args.smoke else "bench_decode.json")).write_text(
            json.dumps(partial, indent=1))  # a crash later still leaves the rows measured so far
    targets = []
    for name, b, hq, hkv, l, d, timing, metric, bound in TARGETS:
        row = next((x for x in results if (x["B"], x["Hq"], x["Hkv"], x["L"], x["D"]) == (b, hq, hkv, l, d)), None)
        val = None if row is None else row["methods"]["parallax"].get(timing, {}).get(metric)
        met = None if val is None else (val >= bound if metric == "tbps" else val <= bound)
        targets.append({"target": name, "value": val, "met": met})
    speedups = []
    for x in results:
        m = x["methods"]
        if x["B"] == 1 and x["L"] >= 16384 and "us" in m.get("fla_decode_one_step", {}).get("flushed", {}):
            s = m["fla_decode_one_step"]["flushed"]["us"] / m["parallax"]["flushed"]["us"]
            speedups.append({"Hq": x["Hq"], "Hkv": x["Hkv"], "L": x["L"], "D": x["D"], "speedup_vs_fla": round(s, 1)})
    targets.append({"target": ">= 10x faster than fla at B=1, L >= 16k (flushed)",
                    "value": min((s["speedup_vs_fla"] for s in speedups), default=None),
                    "met": (min(s["speedup_vs_fla"] for s in speedups) >= 10) if speedups else None,
                    "detail": speedups})
    doc = {"machine": _machine(), "dtype": str(dtype), "hbm_tbps": HBM_TBPS, "reps_per_graph": REPS,
           "timing": {"warm": "CUDA graph of 10 back-to-back calls, median per call (L2 warm where the cache fits)",
                      "flushed": "CUDA graph of one call, 512 MB buffer overwritten before each replay (cache from HBM)"},
           "fla": fla_why or "fla.ops.parallax.decode.parallax_decode_one_step",
           "wall_s": round(time.perf_counter() - t0, 1), "results": results, "skipped": skipped, "targets": targets}
    name = "bench_decode_smoke.json" if args.smoke else "bench_decode.json"
    (out_dir / name).write_text(json.dumps(doc, indent=1))
    for t in targets:
        print(f"target: {t['target']}: {t['value']} -> {'met' if t['met'] else 'MISSED' if t['met'] is False else 'n/a'}")
    print(f"wrote {out_dir / name} ({doc['wall_s']} s)")


if __name__ == "__main__":
    main()
