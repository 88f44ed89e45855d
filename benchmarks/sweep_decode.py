"""Decode variant sweep (GPU, issue 16): the :class:`~parallax_compile.kernels.triton_decode.DecodeVariant`
space on the decode target shapes, beside cuDNN / flash SDPA, in one run of under ~4 minutes.

Shapes (bf16, one query token, full cache): B32 H8:8 L16k D128; B32 Hq32:8 L16k D128; B8 Hq32:8
L16k D128; B1 H8 L16k D128; B1 Hq32:8 L32k D128; B8 Hq4:1 L32k D256; B8 H8:8 L16k D256; B1 H8 L128k
D128. First ``--precompile`` worker processes compile every kernel the sweep may launch (~230, a
few seconds each; jobs not started within ``--precompile-s`` are dropped and compile in line),
before any timing. Then per shape, under a share of ``--budget-s`` (counted from the start; the
share is weighted by the kernels a shape is the first to compile when nothing was precompiled;
shape ``i`` starts no new variant after ``t0 + budget * sum(w[:i+1]) / sum(w)``; what is cut is
listed as skipped):

1. baselines: ``default`` (``variant=None``: the dispatch table, today's choice), ``sdpa_cudnn``,
   ``sdpa_flash`` (``bench_decode._sdpa``: GQA packed as query rows);
2. every ``mode`` x ``tile`` that fits shared memory, split rule and merge at their defaults;
3. for the best tile of each mode: ``programs_per_sm`` in {0.5, 1, 2, 8, 16} (a value giving a
   split count already measured is skipped);
4. the best variant of each mode (when it splits) with ``merge="wide"``, ``pdl=True``, both.

Every variant is first checked on the first two sequences against the float64 oracle
(:func:`~parallax_compile.reference.parallax_attention_ref`; relative Frobenius error <= 1e-2; SDPA
against bench_decode's fp32 softmax oracle); one that fails (or cannot compile) is reported and not
timed. Timing is bench_decode's ``_time_graph``: CUDA-graph replay; ``flushed`` (a 512 MB buffer
overwritten before each replay, the cache read from HBM) for all, ``warm`` too at B = 1. Bandwidth
= the K and V bytes (``bench_decode.kv_bytes``) / time, as a fraction of the device copy bandwidth
measured in the same run (``copy_``, 1 GiB, read + write bytes, ``flushed`` timing) and of
``bench_decode.HBM_TBPS``.

Output: ``--json`` (per shape: each variant's fields, splits, error, us, TB/s, fractions, the best
one; ``dispatch``: for each shape class of ``triton_decode.shape_class`` the variant with the best
worst-case ratio to each shape's fastest, as a ``_DISPATCH`` line to paste), and a table per shape.

Usage (H200, repo root): ``python benchmarks/sweep_decode.py --json $OUT/sweep_decode.json``
(``--modes stack,unstack`` / ``--shapes 0,3`` to narrow a rerun).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import HBM_TBPS, _machine, _rel, _sdpa, _time_graph, kv_bytes, reference

from parallax_compile.kernels import triton_decode as td
from parallax_compile.reference import parallax_attention_ref

SHAPES = [  # (name, B, Hq, Hkv, L, D)
    ("B32 H8:8 L16k D128", 32, 8, 8, 16384, 128),
    ("B32 Hq32:8 L16k D128", 32, 32, 8, 16384, 128),
    ("B8 Hq32:8 L16k D128", 8, 32, 8, 16384, 128),
    ("B1 H8 L16k D128", 1, 8, 8, 16384, 128),
    ("B1 Hq32:8 L32k D128", 1, 32, 8, 32768, 128),
    ("B8 Hq4:1 L32k D256", 8, 4, 1, 32768, 256),
    ("B8 H8:8 L16k D256", 8, 8, 8, 16384, 256),
    ("B1 H8 L128k D128", 1, 8, 8, 131072, 128),
]
TILES = {  # (BLOCK_N, num_warps, num_stages) per head_dim class; the ones over SMEM_BUDGET are dropped
    128: [(64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2), (64, 4, 4), (32, 4, 4), (64, 4, 1)],
    256: [(32, 4, 3), (32, 8, 3), (64, 4, 2), (64, 8, 2), (32, 4, 4), (16, 4, 4), (32, 4, 1)],
}
PROGRAMS_PER_SM = (0.5, 1, 2, 8, 16)
ERR_BOUND = 1e-2
COPY_BYTES = 2**30
DEVICE = "cuda"  # where Shape puts its tensors (a CPU dry run under TRITON_INTERPRET=1 sets "cpu")


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def variant_literal(v: td.DecodeVariant) -> str:
    """``DecodeVariant(...)`` with the fields that differ from the defaults."""
    default = td.DecodeVariant()
    kw = [f"{f.name}={getattr(v, f.name)!r}" for f in dataclasses.fields(v)
          if getattr(v, f.name) != getattr(default, f.name)]
    return f"DecodeVariant({', '.join(kw)})"


def label(v: td.DecodeVariant) -> str:
    tile = "auto" if v.tile is None else "x".join(map(str, v.tile))
    return f"{v.mode}/{tile}/pps{v.programs_per_sm:g}/{v.merge}" + ("/pdl" if v.pdl else "")


def copy_tbps(flush_buf) -> float:
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us = _time_graph(lambda: dst.copy_(src), "flushed", flush_buf)
    return 2 * COPY_BYTES / (us * 1e-6) / 1e12


def device_setup():
    """``(flush buffer, SM count, copy TB/s)`` of the GPU (bench_decode's 512 MB flush buffer)."""
    flush_buf = torch.empty(512 * 2**20 // 4, dtype=torch.float32, device="cuda")
    return flush_buf, torch.cuda.get_device_properties(0).multi_processor_count, copy_tbps(flush_buf)


class Shape:
    """One target shape: inputs, oracles, and the measurement of one method."""

    def __init__(self, name, b, hq, hkv, l, d, sm_count, copy, flush_buf):
        self.name, self.b, self.hq, self.hkv, self.l, self.d = name, b, hq, hkv, l, d
        self.flush_buf, self.copy = flush_buf, copy
        gen = torch.Generator(device=DEVICE).manual_seed(b * 7 + l + d)
        dt = torch.bfloat16
        self.q = torch.randn(b, hq, 1, d, device=DEVICE, dtype=dt, generator=gen)
        self.r = (torch.randn(b, hq, 1, d, device=DEVICE, dtype=dt, generator=gen) * d**-0.5).to(dt)
        self.k = torch.randn(b, hkv, l, d, device=DEVICE, dtype=dt, generator=gen)
        self.v = torch.randn(b, hkv, l, d, device=DEVICE, dtype=dt, generator=gen)
        self.seqlens = torch.full((b,), l, dtype=torch.int32, device=DEVICE)
        self.scale = d**-0.5
        self.rows = min(b, 2)
        self.bytes = kv_bytes(b, hkv, l, d, d, self.k.element_size())
        self.sm_count = sm_count
        self.cls = td.shape_class(b, hq, hkv, 1, d, d, l, sm_count)
        first = (t[:self.rows].double() for t in (self.q, self.r, self.k, self.v))
        self.ref_px = parallax_attention_ref(*first, scale=self.scale)
        self.ref_sm = None
        self.timings = ("flushed", "warm") if b == 1 else ("flushed",)
        self.results: dict[str, dict] = {}

    def splits(self, v: td.DecodeVariant) -> int:
        return td.split_plan(self.b, self.hkv, self.l, self.sm_count, v)[0]

    def measure(self, key: str, fn, ref, extra: dict) -> dict:
        res = dict(extra)
        try:
            res["error"] = float(f"{_rel(fn()[:self.rows], ref):.3g}")
            if not res["error"] <= ERR_BOUND:
                res["status"] = f"failed the correctness check (> {ERR_BOUND}); not timed"
            else:
                for t in self.timings:
                    us = _time_graph(fn, t, self.flush_buf)
                    tbps = self.bytes / (us * 1e-6) / 1e12
                    res[t] = {"us": round(us, 2), "tbps": round(tbps, 3),
                              "frac_copy": round(tbps / self.copy, 3), "frac_hbm": round(tbps / HBM_TBPS, 3)}
                res["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - a variant that cannot compile or run is reported
            res["status"] = f"not available: {_one_line(e)}"
            if self.q.is_cuda:
                torch.cuda.synchronize()  # raises if the context is broken: the run stops, the JSON stays
        self.results[key] = res
        return res

    def variant(self, v: td.DecodeVariant | None) -> dict:
        shown = v or td.pick_variant(self.b, self.hq, self.hkv, 1, self.d, self.d, self.l, self.sm_count)
        key = "default" if v is None else label(v)
        if key in self.results:
            return self.results[key]

        def fn():
            return td.parallax_decode(self.q, self.r, self.k, self.v, self.seqlens, None, self.scale, None,
                                      variant=v)

        extra = {"variant": dataclasses.asdict(shown), "literal": variant_literal(shown),
                 "splits": self.splits(shown)}
        return self.measure(key, fn, self.ref_px, extra)

    def sdpa(self, backend: str) -> dict:
        if self.ref_sm is None:
            self.ref_sm = reference(self.q, None, self.k, self.v, self.scale, self.rows)
        call = _sdpa(backend)
        return self.measure(f"sdpa_{backend}", lambda: call(self.q, self.k, self.v, self.scale), self.ref_sm,
                            {})

    def us(self, key: str) -> float | None:
        return self.results.get(key, {}).get("flushed", {}).get("us")

    def best(self, keys=None) -> str | None:
        keys = self.results if keys is None else keys
        keys = [k for k in keys if not k.startswith("sdpa") and self.us(k)]
        return min(keys, key=self.us, default=None)


def first_plan(hq: int, hkv: int, d: int, modes: list[str], item: int = 2) -> list[td.DecodeVariant]:
    """Step 2: every mode (``"vector"`` only for Hq = Hkv) x every tile that fits."""
    modes = [m for m in modes if m != "vector" or hq == hkv]
    tiles = [t for t in TILES[128 if d <= 128 else 256] if td.tile_fits(t, d, d, item)]
    return [td.DecodeVariant(mode=m, tile=t) for m in modes for t in tiles]


def budget_weights(shapes, modes: list[str], compiled: bool) -> list[float]:
    """3 + the number of step-2 kernels a shape is the first to compile (unless precompiled)."""
    seen, out = set(), []
    for _, _, hq, hkv, _, d in shapes:
        keys = {(v.mode, v.tile, d, hq // hkv) for v in first_plan(hq, hkv, d, modes)}
        out.append(3.0 + (0 if compiled else len(keys - seen)))
        seen |= keys
    return out


def pdl_probe(flush_buf) -> str:
    """"" when a small split decode with ``pdl=True`` runs, captures and replays in a CUDA graph and
    matches ``pdl=False``; else why not (the sweep then leaves ``pdl`` out)."""
    if DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 9:
        return "needs compute capability >= 9"
    q, r = (torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.full((2,), 4096, dtype=torch.int32, device="cuda")
    try:
        outs = [td.parallax_decode(q, r, k, v, lens, None, 0.1, None, num_splits=8,
                                   variant=td.DecodeVariant(pdl=p)) for p in (False, True)]
        _time_graph(lambda: td.parallax_decode(q, r, k, v, lens, None, 0.1, None, num_splits=8,
                                               variant=td.DecodeVariant(pdl=True)), "warm", flush_buf)
        torch.cuda.synchronize()
        return "" if torch.equal(outs[0], outs[1]) else "pdl=True differs from pdl=False"
    except Exception as e:  # noqa: BLE001
        return _one_line(e)


def sweep_shape(s: Shape, modes: list[str], deadline: float, log, pdl: bool = True) -> list[str]:
    """Run the four steps of the module docstring on one shape; returns the labels cut by the deadline."""
    for key, call in (("default", lambda: s.variant(None)), ("sdpa_cudnn", lambda: s.sdpa("cudnn")),
                      ("sdpa_flash", lambda: s.sdpa("flash"))):
        log(s, key, call())
    plan = first_plan(s.hq, s.hkv, s.d, modes, s.k.element_size())
    modes = list(dict.fromkeys(v.mode for v in plan))
    skipped: list[str] = []

    def run(vs):
        for v in vs:
            if time.perf_counter() > deadline:
                skipped.append(label(v))
                continue
            res = s.variant(v)
            log(s, label(v), res)

    run(plan)
    best_of = {}
    for m in modes:
        keys = [label(v) for v in plan if v.mode == m]
        if (k := s.best(keys)) is not None:
            best_of[m] = td.DecodeVariant(**s.results[k]["variant"])
    for m, v in best_of.items():
        seen = {s.splits(v)}
        more = []
        for pps in PROGRAMS_PER_SM:
            w = dataclasses.replace(v, programs_per_sm=pps)
            if (n := s.splits(w)) not in seen:
                seen.add(n)
                more.append(w)
        run(more)
    for m in best_of:
        keys = [k for k, x in s.results.items() if x.get("variant", {}).get("mode") == m and k != "default"]
        if (k := s.best(keys)) is not None and s.results[k]["splits"] > 1:
            v = td.DecodeVariant(**s.results[k]["variant"])
            more = [dataclasses.replace(v, merge="wide")]
            if pdl:
                more += [dataclasses.replace(v, pdl=True), dataclasses.replace(v, merge="wide", pdl=True)]
            run(more)
    return skipped


# ------------------------------------------------------------------ precompiling in parallel processes
# Triton compiles one kernel at a time per process (seconds each); the sweep needs ~100. Before any
# timing, worker processes run one small decode call per kernel the sweep may launch, which fills
# the on-disk Triton cache; the measuring process then loads the binaries. The scalars that vary
# per call (split count, chunk) are not specialised on (triton_decode._NO_SPECIALIZE), so a small
# input compiles the same kernel as the real shape.

_WORKER_INPUTS: dict = {}


def _precompile_job(job) -> str:
    device, hq, hkv, d, fields, num_splits = job
    key = (device, hq, hkv, d)
    if key not in _WORKER_INPUTS:
        _WORKER_INPUTS.clear()
        l = max(num_splits, 256) * td.SPLIT_GRANULE  # room for 256 splits
        q, r = (torch.randn(1, hq, 1, d, device=device, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(1, hkv, l, d, device=device, dtype=torch.bfloat16) for _ in range(2))
        _WORKER_INPUTS[key] = (q, r, k, v, torch.full((1,), l, dtype=torch.int32, device=device))
    q, r, k, v, lens = _WORKER_INPUTS[key]
    try:
        td.parallax_decode(q, r, k, v, lens, None, d**-0.5, None, num_splits=num_splits,
                           variant=td.DecodeVariant(**fields))
        if q.is_cuda:
            torch.cuda.synchronize()
        return ""
    except Exception as e:  # noqa: BLE001 - reported again (and recorded) when the sweep runs the variant
        return _one_line(e)


def precompile_jobs(shapes, modes: list[str], sm_count: int) -> list[tuple]:
    """One job per distinct kernel (main and merge launch) the sweep may compile for ``shapes``."""
    jobs, merge_only, seen = [], [], set()

    def add(hq, hkv, d, v, n):
        main = (hq // hkv, d, v.mode, v.tile, n > 1, v.pdl and n > 1)
        merge = (d, triton.next_power_of_2(n), v.merge, v.pdl) if n > 1 else None
        if main in seen and (merge is None or merge in seen):
            return
        # jobs that only add a merge kernel go last: their split kernel is compiled by then
        (merge_only if main in seen else jobs).append((DEVICE, hq, hkv, d, dataclasses.asdict(v), n))
        seen.update({main, merge})

    for _, b, hq, hkv, l, d in shapes:
        default = td.pick_variant(b, hq, hkv, 1, d, d, l, sm_count)
        add(hq, hkv, d, default, td.split_plan(b, hkv, l, sm_count, default)[0])
        for v in first_plan(hq, hkv, d, modes):
            counts = {td.split_plan(b, hkv, l, sm_count, dataclasses.replace(v, programs_per_sm=p))[0]
                      for p in (v.programs_per_sm, *PROGRAMS_PER_SM)}
            for n in sorted(counts):
                for merge, pdl in (("rows", False), ("wide", False), ("rows", True), ("wide", True)):
                    if n > 1 or (merge, pdl) == ("rows", False):
                        add(hq, hkv, d, dataclasses.replace(v, merge=merge, pdl=pdl), n)
    return jobs + merge_only


def precompile(shapes, modes: list[str], sm_count: int, workers: int, limit_s: float) -> dict:
    """Run :func:`precompile_jobs` on ``workers`` processes; jobs not started after ``limit_s`` are
    dropped (those kernels then compile in line)."""
    jobs = precompile_jobs(shapes, modes, sm_count)
    t = time.perf_counter()
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [ex.submit(_precompile_job, job) for job in jobs]
    wait(futures, timeout=limit_s)
    ex.shutdown(wait=True, cancel_futures=True)
    ran = [f.result() for f in futures if f.done() and not f.cancelled()]
    errors = [e for e in ran if e]
    out = {"kernels": len(jobs), "done": len(ran), "workers": workers,
           "wall_s": round(time.perf_counter() - t, 1), "errors": len(errors),
           "first_errors": sorted(set(errors))[:5]}
    print(f"precompiled {out['done']} of {out['kernels']} kernels with {workers} processes in "
          f"{out['wall_s']} s ({out['errors']} failed: {out['first_errors']})", flush=True)
    return out


def dispatch_suggestion(shapes: list[Shape]) -> dict:
    """Per shape class: the variant measured on all its shapes with the best worst-case ratio
    (shape's fastest time / variant's time)."""
    out = {}
    for cls in dict.fromkeys(s.cls for s in shapes):
        group = [s for s in shapes if s.cls == cls]
        lits = None
        for s in group:
            ok = {x["literal"] for k, x in s.results.items() if "literal" in x and s.us(k)}
            lits = ok if lits is None else lits & ok
        best_score, best_lit = 0.0, None
        if any(s.best() is None for s in group):
            lits = None
        for lit in sorted(lits or ()):
            score = min(s.us(s.best()) / min(s.us(k) for k, x in s.results.items()
                                                if x.get("literal") == lit and s.us(k)) for s in group)
            if score > best_score:
                best_score, best_lit = score, lit
        out[repr(cls)] = {"shapes": [s.name for s in group], "variant": best_lit,
                          "worst_ratio_to_best": round(best_score, 3),
                          "line": f"    {cls!r}: {best_lit},  # {', '.join(s.name for s in group)}"}
    return out


def _log(s: Shape, key: str, res: dict) -> None:
    f = res.get("flushed", {})
    w = res.get("warm", {}).get("us")
    print(f"  {s.name:22s} {key:30s} splits {res.get('splits', '-'):>3} err {res.get('error', '-'):>8} "
          f"{f.get('us', '-'):>9} us {f.get('tbps', '-'):>6} TB/s {f.get('frac_copy', '-'):>6} of copy"
          + (f"  warm {w} us" if w is not None else "")
          + ("" if res.get("status") == "ok" else f"  [{res.get('status')}]"), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="stop starting variants after this many seconds (shared out per shape)")
    ap.add_argument("--modes", default=",".join(td.MODES),
                    help="comma-separated subset of " + ",".join(td.MODES))
    ap.add_argument("--shapes", default="", help="comma-separated indices into SHAPES (default: all)")
    ap.add_argument("--precompile", type=int, default=min(14, max(0, (os.cpu_count() or 2) - 2)),
                    help="processes that compile the kernels before the timing starts (0: compile in line)")
    ap.add_argument("--precompile-s", type=float, default=90.0, help="start no precompile job after this")
    args = ap.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("sweep_decode.py needs a CUDA GPU")
    t0 = time.perf_counter()
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in td.MODES]
    if bad:
        sys.exit(f"--modes: unknown {bad}; expected a subset of {td.MODES}")
    picked = [SHAPES[int(i)] for i in args.shapes.split(",") if i] if args.shapes else SHAPES
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 4
    compiled = None
    if args.precompile > 0:
        compiled = precompile(picked, modes, sm_count, args.precompile, args.precompile_s)
    flush_buf, sm_count, copy = device_setup()
    no_pdl = pdl_probe(flush_buf)
    print(f"pdl: {no_pdl or 'ok'}", flush=True)
    print(f"{_machine()}\ncopy bandwidth (1 GiB copy_, flushed): {copy:.3f} TB/s; budget {args.budget_s} s",
          flush=True)
    doc = {"machine": _machine(), "copy_tbps": round(copy, 3), "hbm_tbps": HBM_TBPS, "err_bound": ERR_BOUND,
           "budget_s": args.budget_s, "modes": modes, "precompile": compiled,
           "pdl": no_pdl or "ok", "shapes": []}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    done: list[Shape] = []
    broken = None
    weights = budget_weights(picked, modes, compiled is not None)
    for i, (name, b, hq, hkv, l, d) in enumerate(picked):
        deadline = t0 + args.budget_s * sum(weights[:i + 1]) / sum(weights)
        s = Shape(name, b, hq, hkv, l, d, sm_count, copy, flush_buf)
        print(f"== {name}: class {s.cls}, {s.bytes / 1e6:.0f} MB of K+V", flush=True)
        entry = {"name": name, "B": b, "Hq": hq, "Hkv": hkv, "L": l, "D": d, "class": list(s.cls),
                 "kv_bytes": s.bytes, "results": s.results}
        doc["shapes"].append(entry)
        try:
            skipped = sweep_shape(s, modes, deadline, _log, pdl=not no_pdl)
        except Exception as e:  # noqa: BLE001 - a broken CUDA context: keep what was measured
            broken = _one_line(e)
            skipped = ["(run stopped)"]
        best = s.best()
        entry |= {"skipped": skipped, "best": best}
        for k in dict.fromkeys((best, "default", "sdpa_cudnn", "sdpa_flash")):
            if k and s.us(k):
                print(f"  -> {k}: {s.us(k)} us, {s.results[k]['flushed']['tbps']} TB/s"
                      + (f" ({s.results[k].get('literal')})" if k == best else ""), flush=True)
        if skipped:
            print(f"  ({len(skipped)} variants cut by the time budget)", flush=True)
        done.append(s)
        del s.k, s.v
        torch.cuda.empty_cache()
        doc["wall_s"] = round(time.perf_counter() - t0, 1)
        args.json.write_text(json.dumps(doc, indent=1))
        if broken:
            doc["stopped"] = broken
            print(f"stopped: {broken}", flush=True)
            break
    doc["dispatch"] = dispatch_suggestion(done)
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    args.json.write_text(json.dumps(doc, indent=1))
    print("suggested _DISPATCH entries (worst ratio to each shape's fastest measured variant):")
    for v in doc["dispatch"].values():
        print(f"{v['line']}  ratio {v['worst_ratio_to_best']}")
    print(f"wrote {args.json} ({doc['wall_s']} s)")


if __name__ == "__main__":
    main()
