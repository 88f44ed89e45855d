"""GPU benchmark of the fused Parallax Triton kernels against softmax-attention baselines and fla.

Providers (each "not available" instead of crashing when it cannot run):

* ``parallax``: :mod:`parallax_compile.kernels.triton_parallax` (``parallax_fwd`` / ``parallax_bwd``);
* ``fla``: ``fla.ops.parallax.parallel_parallax`` (the peer Triton implementation, layout
  ``[B, T, H, D]``, causal only), imported lazily;
* ``sdpa-flash`` / ``sdpa-cudnn``: ``F.scaled_dot_product_attention`` under ``sdpa_kernel`` with
  the FlashAttention-2 / cuDNN backend (softmax only: half of Parallax's GEMMs).

Modes ``fwd``, ``bwd`` (the backward alone, from saved forward outputs) and ``fwd+bwd``.
FLOPs: Parallax forward ``8*B*Hq*Lq*Lk*D`` (four GEMMs), softmax forward ``4*B*Hq*Lq*Lk*D``; causal
halves both; the backward is counted as 2x (Parallax, eight GEMMs) and 2.5x (softmax, five
GEMMs) the forward. TFLOP/s is each provider's own FLOPs over its time; ``vs`` columns are time
ratios (how many times faster ``parallax`` runs).

Timing: ``triton.testing.do_bench`` (median of CUDA-event timed reps; it writes a 256 MB buffer
before every rep, so L2 is flushed), after a warm-up that also runs the autotuner. The bf16
8192^3 GEMM ceiling is measured in the same run; ``frac`` is TFLOP/s over that ceiling.

Correctness before timing: on a reduced shape of each config (``B=1``, at most 4 query heads with
the same GQA ratio, ``L <= 1024``), the output and all four gradients of ``parallax`` are compared
with the fp32 ``chunked`` implementation run on the same (upcast) inputs (relative RMS error,
bf16 <= 2e-2, fp16 <= 5e-3); ``fla`` output is compared the same way. A provider that fails its
check is timed but reported as FAILED, with no ratios.

Usage::

    python benchmarks/bench_attention.py                      # the fla reference shape (B4 H32 L4096 D128 causal)
    python benchmarks/bench_attention.py --preset fa3         # FA3 grid: B*L=16384, L 1k..16k, D 64/128, causal/full
    python benchmarks/bench_attention.py --preset all --modes fwd bwd --json out.json
    python benchmarks/bench_attention.py --config B4-H32-L4096-D128-causal --providers parallax fla
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DEFAULT_OUT = HERE / "results" / "bench_attention.json"
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Shape:
    name: str
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    causal: bool
    window: int | None = None

    def reduced(self) -> Shape:
        g = self.hq // self.hkv
        hkv = max(1, min(self.hkv, 4 // min(g, 4)))
        l_q, l_k = min(self.lq, 1024), min(self.lk, 1024)
        return Shape(self.name + "-reduced", 1, hkv * min(g, 4), hkv, l_q, l_k, self.d, self.causal, self.window)


def _shape(b, hq, hkv, l, d, causal, window=None, tag=""):
    kv = f"{hq}:{hkv}" if hkv != hq else f"{hq}"
    name = f"B{b}-H{kv}-L{l}-D{d}-{'causal' if causal else 'full'}" + (f"-W{window}" if window else "") + tag
    return Shape(name, b, hq, hkv, l, l, d, causal, window)


def presets() -> dict[str, list[Shape]]:
    ref = [_shape(4, 32, 32, 4096, 128, True)]
    fa3 = []
    for d in (64, 128):
        for l in (1024, 2048, 4096, 8192, 16384):
            for causal in (True, False):
                fa3.append(_shape(16384 // l, 2048 // d, 2048 // d, l, d, causal))
    gqa = [_shape(16384 // l, 32, 8, l, 128, True) for l in (2048, 8192)]
    extra = [_shape(4, 32, 32, 4096, 64, True), _shape(2, 32, 32, 8192, 128, True, window=1024),
             _shape(4, 8, 8, 4096, 256, True)]
    quick = ref + [_shape(4, 32, 32, 4096, 128, False), _shape(4, 32, 8, 4096, 128, True), _shape(8, 16, 16, 2048, 64, True)]
    return {"ref": ref, "quick": quick, "fa3": fa3, "gqa": gqa, "extra": extra, "all": ref + fa3 + gqa + extra}


# --------------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------------


def _inputs(s: Shape, dtype, device="cuda", grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(s.b, s.hq, s.lq, s.d, device=device, dtype=dtype, generator=g)
    r = torch.randn(s.b, s.hq, s.lq, s.d, device=device, dtype=dtype, generator=g) * s.d**-0.5
    k = torch.randn(s.b, s.hkv, s.lk, s.d, device=device, dtype=dtype, generator=g)
    v = torch.randn(s.b, s.hkv, s.lk, s.d, device=device, dtype=dtype, generator=g)
    do = torch.randn(s.b, s.hq, s.lq, s.d, device=device, dtype=dtype, generator=g)
    if grad:
        q, r, k, v = (t.requires_grad_(True) for t in (q, r, k, v))
    return q, r, k, v, do


class Provider:
    name = "?"
    softmax_only = False

    def available(self, s: Shape, dtype) -> str | None:
        """None when it can run ``s``; else why not."""
        return None

    def make(self, s: Shape, dtype, mode: str):
        """Return a zero-argument callable doing one ``mode`` step on fresh inputs."""
        raise NotImplementedError


class ParallaxTriton(Provider):
    name = "parallax"

    def __init__(self):
        try:
            from parallax_compile.kernels import triton_parallax as tp
            self.tp, self.err = tp, None
        except Exception as e:  # noqa: BLE001 - reported as "not available"
            self.tp, self.err = None, f"{type(e).__name__}: {e}"

    def available(self, s, dtype):
        if self.tp is None:
            return self.err
        q, r, k, v, _ = _inputs(Shape("probe", 1, s.hq, s.hkv, 1, 1, s.d, s.causal), dtype)
        return self.tp.unsupported_reason(q, r, k, v, None, None, s.causal, s.window)

    def run(self, q, r, k, v, do, s, grad=True):
        tp = self.tp
        out = tp.parallax_fwd(q, r, k, v, None, None, s.causal, s.window)
        if not grad:
            return out, None
        return out, tp.parallax_bwd(do, q, r, k, v, *out, None, None, s.causal, s.window, False)[:4]

    def make(self, s, dtype, mode):
        tp = self.tp
        q, r, k, v, do = _inputs(s, dtype)
        if mode == "fwd":
            return lambda: tp.parallax_fwd(q, r, k, v, None, None, s.causal, s.window)
        if mode == "bwd":
            saved = tp.parallax_fwd(q, r, k, v, None, None, s.causal, s.window)
            return lambda: tp.parallax_bwd(do, q, r, k, v, *saved, None, None, s.causal, s.window, False)

        def step():
            saved = tp.parallax_fwd(q, r, k, v, None, None, s.causal, s.window)
            return tp.parallax_bwd(do, q, r, k, v, *saved, None, None, s.causal, s.window, False)
        return step


class Fla(Provider):
    name = "fla"

    def __init__(self):
        try:
            from fla.ops.parallax import parallel_parallax
            self.fn, self.err = parallel_parallax, None
        except Exception as e:  # noqa: BLE001 - reported as "not available"
            self.fn, self.err = None, f"not available ({type(e).__name__}: {e})"

    def available(self, s, dtype):
        if self.fn is None:
            return self.err
        if not s.causal:
            return "causal only"
        if s.lq != s.lk:
            return "Lq == Lk only"
        return None

    def _bthd(self, s, dtype, grad):
        q, r, k, v, do = _inputs(s, dtype)
        q, r, k, v, do = (t.transpose(1, 2).contiguous() for t in (q, r, k, v, do))
        if grad:
            q, r, k, v = (t.requires_grad_(True) for t in (q, r, k, v))
        return q, r, k, v, do

    def make(self, s, dtype, mode):
        q, r, k, v, do = self._bthd(s, dtype, grad=mode != "fwd")
        fn = lambda: self.fn(q, r, k, v, window_size=s.window)
        if mode == "fwd":
            return lambda: fn()
        if mode == "bwd":
            out = fn()
            return lambda: torch.autograd.grad(out, (q, r, k, v), do, retain_graph=True)
        return lambda: torch.autograd.grad(fn(), (q, r, k, v), do)


class Sdpa(Provider):
    softmax_only = True

    def __init__(self, name, backend):
        self.name, self.backend = name, backend

    def available(self, s, dtype):
        if s.window is not None:
            return "no sliding window"
        try:
            fn = self.make(Shape("probe", 1, s.hq, s.hkv, 128, 128, s.d, s.causal), dtype, "fwd+bwd")
            fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported as "not available"
            return f"not available ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
        return None

    def make(self, s, dtype, mode):
        from torch.nn.attention import sdpa_kernel

        q, _, k, v, do = _inputs(s, dtype)
        q, k, v = (t.requires_grad_(mode != "fwd") for t in (q, k, v))
        gqa = s.hq != s.hkv
        backend = self.backend

        def fwd():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=s.causal, enable_gqa=gqa)

        if mode == "fwd":
            return fwd
        if mode == "bwd":
            out = fwd()
            return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
        return lambda: torch.autograd.grad(fwd(), (q, k, v), do)


def make_providers(names):
    from torch.nn.attention import SDPBackend

    table = {
        "parallax": ParallaxTriton,
        "fla": Fla,
        "sdpa-flash": lambda: Sdpa("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": lambda: Sdpa("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
    }
    return [table[n]() for n in names]


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------


def _rel(x, ref):
    ref = ref.float()
    return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference(s: Shape, dtype, seed=1):
    """Inputs ``(q, r, k, v, do)`` of shape ``s`` in ``dtype`` and the fp32 ``chunked`` output and
    gradients ``(out, [dq, dr, dk, dv])`` on the same (upcast) inputs."""
    from parallax_compile.kernels import chunked

    q, r, k, v, do = _inputs(s, dtype, seed=seed)
    f32 = [t.float() for t in (q, r, k, v)]
    scale = s.d**-0.5
    ref = chunked.parallax_fwd(*f32, None, scale, s.causal, s.window)
    ref_g = chunked.parallax_bwd(do.float(), *f32, *ref, None, scale, s.causal, s.window, False)[:4]
    return (q, r, k, v, do), (ref[0], list(ref_g))


def errors(out, grads, ref) -> dict[str, float]:
    """Relative RMS errors of ``out`` and ``grads`` (dq, dr, dk, dv; None entries skipped) against
    :func:`reference`'s ``ref``."""
    errs = {"out": _rel(out, ref[0])} if out is not None else {}
    errs.update({n: _rel(g, rg) for n, g, rg in zip(("dq", "dr", "dk", "dv"), grads, ref[1]) if g is not None})
    return errs


def check_correctness(providers, s: Shape, dtype) -> dict[str, dict]:
    """Reduced shape: parallax (out + 4 grads) and fla (out + 4 grads) vs fp32 chunked."""
    red = s.reduced()
    (q, r, k, v, do), ref_all = reference(red, dtype)
    tol = TOL[dtype]
    res = {}
    for p in providers:
        if p.softmax_only or p.available(red, dtype) is not None:
            continue
        try:
            if isinstance(p, ParallaxTriton):
                out, grads = p.run(q, r, k, v, do, red)
                out = out[0]
            else:  # fla, [B, T, H, D]
                xs = [t.transpose(1, 2).contiguous().requires_grad_(True) for t in (q, r, k, v)]
                o = p.fn(*xs, window_size=red.window)
                grads = [g.transpose(1, 2) for g in torch.autograd.grad(o, xs, do.transpose(1, 2).contiguous())]
                out = o.transpose(1, 2)
            errs = errors(out, grads, ref_all)
            ok = all(math.isfinite(e) and e <= tol for e in errs.values())
            res[p.name] = {"ok": ok, "errors": errs, "shape": asdict(red)}
        except Exception as e:  # noqa: BLE001 - recorded as a failed check
            res[p.name] = {"ok": False, "errors": {}, "exception": f"{type(e).__name__}: {e}"}
    return res


def flops(s: Shape, mode: str, softmax_only: bool) -> float:
    if s.window is not None:  # keys seen per row (causal window), approx.
        pairs = s.lq * min(s.window, s.lk)
    else:
        pairs = s.lq * s.lk / (2 if s.causal else 1)
    fwd = (4 if softmax_only else 8) * s.b * s.hq * pairs * s.d
    bwd = fwd * (2.5 if softmax_only else 2.0)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def bench(fn, warmup_ms=25, rep_ms=100) -> float:
    import triton

    fn()  # compile / autotune
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def gemm_ceiling(n=8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, rep_ms=300)
    return 2 * n**3 / ms / 1e9


def machine() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0), "sm_count": p.multi_processor_count,
        "cc": f"{p.major}.{p.minor}", "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__, "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ref", choices=sorted(presets()))
    ap.add_argument("--config", nargs="*", help="config names (from any preset) instead of --preset")
    ap.add_argument("--providers", nargs="*", default=["parallax", "fla", "sdpa-flash", "sdpa-cudnn"])
    ap.add_argument("--modes", nargs="*", default=["fwd", "bwd", "fwd+bwd"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--rep-ms", type=float, default=100)
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check (not recommended)")
    ap.add_argument("--json", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU")
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    all_shapes = {s.name: s for ss in presets().values() for s in ss}
    shapes = [all_shapes[n] for n in args.config] if args.config else presets()[args.preset]

    info = machine()
    ceiling = gemm_ceiling()
    info["gemm_bf16_8192_tflops"] = round(ceiling, 1)
    print(f"# {info['gpu']} ({info['sm_count']} SMs, cc {info['cc']}), torch {info['torch']}, CUDA {info['cuda']}, "
          f"triton {info['triton']}, {info['date']}")
    print(f"# bf16 GEMM 8192^3 ceiling: {ceiling:.0f} TFLOP/s; dtype {args.dtype}; L2 flushed per rep (do_bench)")
    providers = make_providers(args.providers)
    results = []
    for s in shapes:
        checks = {} if args.no_check else check_correctness(providers, s, dtype)
        for name, c in checks.items():
            errs = " ".join(f"{k}={v:.1e}" for k, v in c.get("errors", {}).items())
            print(f"# check {s.name} {name}: {'ok' if c['ok'] else 'FAILED'} {errs} {c.get('exception', '')}")
        for mode in args.modes:
            row = {}
            for p in providers:
                why = p.available(s, dtype)
                entry = {"shape": asdict(s), "provider": p.name, "mode": mode, "dtype": args.dtype}
                if why is not None:
                    entry.update(status="n/a", reason=why)
                else:
                    try:
                        ms = bench(p.make(s, dtype, mode), rep_ms=args.rep_ms)
                        tf = flops(s, mode, p.softmax_only) / ms / 1e9
                        ok = checks.get(p.name, {"ok": True})["ok"]
                        entry.update(status="ok" if ok else "FAILED-correctness", ms=ms, tflops=tf,
                                     frac_ceiling=tf / ceiling)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        entry.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    torch.cuda.empty_cache()
                row[p.name] = entry
                results.append(entry)
            base = row.get("parallax", {})
            for name, e in row.items():
                if name != "parallax" and e.get("status") == "ok" and base.get("status") == "ok":
                    base[f"speedup_vs_{name}"] = e["ms"] / base["ms"]
            _print_row(s, mode, row)
        _write(args.json, info, results)  # after every shape: a run cut short keeps what it measured
    print(f"# wrote {args.json}")
    return 0


def _write(path: Path, info: dict, results: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "results": results}, indent=2))


def _print_row(s: Shape, mode: str, row: dict) -> None:
    cells = []
    for name, e in row.items():
        if e.get("status") in ("ok", "FAILED-correctness"):
            flag = "" if e["status"] == "ok" else " FAILED"
            cells.append(f"{name} {e['ms']:.3f}ms {e['tflops']:.0f}TF ({e['frac_ceiling']:.0%}){flag}")
        else:
            cells.append(f"{name} {e.get('status')}")
    base = row.get("parallax", {})
    ratios = " ".join(f"x{base[k]:.2f} vs {k[11:]}" for k in base if k.startswith("speedup_vs_"))
    print(f"{s.name:<34} {mode:<8} | " + " | ".join(cells) + (f" || parallax {ratios}" if ratios else ""), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
