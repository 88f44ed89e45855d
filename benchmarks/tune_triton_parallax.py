"""Time every candidate tile config of each Parallax Triton kernel on one shape (GPU).

For picking the autotune lists in :mod:`parallax_compile.kernels.triton_parallax`: each kernel is
run with exactly one config at a time (the autotuner's list is swapped for that config), timed with
``triton.testing.do_bench`` (L2 flushed per rep), and the compiled kernel's registers / spills are
printed. Forward FLOPs ``8*B*Hq*Lq*Lk*D`` (/2 causal); dK/dV and dQ/dR kernels are reported in ms
(together with the preprocess they make the backward).

Usage::

    python benchmarks/tune_triton_parallax.py                       # B4 H32 L4096 D128 causal bf16
    python benchmarks/tune_triton_parallax.py --shape 2 16 16 8192 64 --no-causal --kernels fwd
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANDIDATES = {
    # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (128, 32, 8, 3), (128, 32, 8, 4),
            (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 4, 2)],
    "dkv": [(32, 128, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2), (64, 128, 8, 2), (32, 128, 8, 3),
            (32, 64, 4, 2), (16, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2)],
    "dq": [(128, 32, 8, 3), (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 2),
           (64, 64, 4, 3), (64, 128, 8, 2)],
}


def _spills(kernel) -> str:
    try:
        for cache in kernel.fn.device_caches.values():
            compiled = list(cache[0].values())[-1]  # the most recently compiled: this config
            return f"regs={compiled.n_regs} spills={compiled.n_spills}"
    except Exception:  # noqa: BLE001, S110 - the register count is optional
        pass
    return ""


def main(argv=None) -> int:
    import triton
    from triton.testing import do_bench

    from parallax_compile.kernels import triton_parallax as tp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs=5, type=int, default=[4, 32, 32, 4096, 128], metavar=("B", "HQ", "HKV", "L", "D"))
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--kernels", nargs="*", default=["fwd", "dkv", "dq"])
    ap.add_argument("--rep-ms", type=float, default=60)
    ap.add_argument("--breakdown", action="store_true", help="also time each backward kernel alone")
    ap.add_argument("--only", nargs="*", default=None, help="candidate tiles to try, e.g. fwd:128,64,8,3")
    args = ap.parse_args(argv)
    b, hq, hkv, l, d = args.shape
    causal = not args.no_causal
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    q = torch.randn(b, hq, l, d, device="cuda", dtype=dtype)
    r = torch.randn(b, hq, l, d, device="cuda", dtype=dtype) * d**-0.5
    k = torch.randn(b, hkv, l, d, device="cuda", dtype=dtype)
    v = torch.randn(b, hkv, l, d, device="cuda", dtype=dtype)
    do = torch.randn(b, hq, l, d, device="cuda", dtype=dtype)
    fwd_flops = 8 * b * hq * l * l * d / (2 if causal else 1)
    print(f"# {torch.cuda.get_device_name(0)} triton {triton.__version__} shape B{b} H{hq}:{hkv} L{l} D{d} "
          f"{'causal' if causal else 'full'} {args.dtype}", flush=True)
    kernels = {"fwd": tp.parallax_fwd_kernel, "dkv": tp.parallax_bwd_kernel_dkv, "dq": tp.parallax_bwd_kernel_dq}
    # kernels not being swept run one fixed config, so that a backward timing varies with one kernel
    bucket = tp._bucket({"BLOCK_D": tp._block(d), "BLOCK_DV": tp._block(d), "q": q})
    fixed = {n: tp._TILES[n][bucket][0] for n in ("fwd", "dkv", "dq")}
    for n, (bm, bn, w, s) in fixed.items():
        kernels[n].configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
        kernels[n].cache = {}
    saved = tp.parallax_fwd(q, r, k, v, None, None, causal, None)
    best = {}
    for name in args.kernels:
        kern = kernels[name]
        tiles = CANDIDATES[name]
        if args.only is not None:
            tiles = [tuple(map(int, o.split(":")[1].split(","))) for o in args.only if o.split(":")[0] == name]
        for bm, bn, w, s in tiles:
            cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            kern.configs, kern.cache = [cfg], {}
            if name == "fwd":
                fn = lambda: tp.parallax_fwd(q, r, k, v, None, None, causal, None)
            else:
                fn = lambda: tp.parallax_bwd(do, q, r, k, v, *saved, None, None, causal, None, False)
            try:
                fn()
                torch.cuda.synchronize()
                ms = do_bench(fn, warmup=20, rep=args.rep_ms, return_mode="median")
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported
                print(f"{name} {bm}x{bn} w{w} s{s}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
                continue
            extra = f" {fwd_flops / ms / 1e9:.0f} TFLOP/s" if name == "fwd" else " (whole backward incl. the other kernel)"
            print(f"{name} BM{bm} BN{bn} w{w} s{s}: {ms:.3f} ms{extra} {_spills(kern)}", flush=True)
            if name not in best or ms < best[name][0]:
                best[name] = (ms, (bm, bn, w, s))
        bm, bn, w, s = fixed[name]
        kern.configs, kern.cache = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)], {}
    for n, (ms, c) in best.items():
        print(f"# best {n}: {c} {ms:.3f} ms")
    if args.breakdown:
        _breakdown(tp, q, r, k, v, do, saved, causal, args.rep_ms)
    return 0


class _Skip:
    """Stands in for a kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


def _breakdown(tp, q, r, k, v, do, saved, causal, rep_ms):
    """Backward time split: preprocess alone, + dK/dV kernel, + dQ/dR kernel (fixed configs)."""
    from triton.testing import do_bench

    names = ("parallax_bwd_kernel_dkv", "parallax_bwd_kernel_dq")
    real = {n: getattr(tp, n) for n in names}
    fn = lambda: tp.parallax_bwd(do, q, r, k, v, *saved, None, None, causal, None, False)
    try:
        for label, skip in (("preprocess only", names), ("preprocess + dkv", names[1:]),
                            ("preprocess + dq", names[:1]), ("whole backward", ())):
            for n in names:
                setattr(tp, n, _Skip() if n in skip else real[n])
            ms = do_bench(fn, warmup=20, rep=rep_ms, return_mode="median")
            print(f"# breakdown {label}: {ms:.3f} ms", flush=True)
    finally:
        for n in names:
            setattr(tp, n, real[n])


if __name__ == "__main__":
    raise SystemExit(main())
