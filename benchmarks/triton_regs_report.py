"""Registers, spills and shared memory of the Parallax Triton kernels for sm_90a, without a GPU.

Compiles each (kernel, tile config) ahead of time for an H100/H200 target
(``GPUTarget("cuda", 90, 32)``) with the same specialisation the runtime gives real tensors
(16-byte-aligned pointers, strides and lengths divisible by 16), then runs the ``ptxas`` that ships
with Triton with ``-v`` on the PTX. Spills and wgmma counts here predicted the H200 timings well
(the configs that spill most were the slowest); use it to prune candidates before spending device
time on ``benchmarks/tune_triton_parallax.py``.

Usage (do not set TRITON_INTERPRET)::

    python benchmarks/triton_regs_report.py                      # every candidate config, D=128 bf16 causal
    python benchmarks/triton_regs_report.py --d 256 --kernels dkv --only 16,32,4,1 32,32,8,1
    python benchmarks/triton_regs_report.py --fwd-variant tma-persistent --bwd-variant atomic-dq
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_POINTERS = {"q", "r", "k", "v", "o", "mu", "do", "dk", "dv", "dq", "dres"}
_STATS = {"lse", "c", "dc", "dr", "dq_acc", "dr_acc"}


def _signature(fn, dtype: str) -> dict[str, str]:
    sig = {}
    for n in fn.arg_names:
        if n in _POINTERS:
            sig[n] = "*" + dtype
        elif n in _STATS or n == "mask":
            sig[n] = "*fp32"
        elif n.startswith("cu_seqlens"):
            sig[n] = "*i32"
        elif n in ("qk_scale", "scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def compile_report(kernel, dtype: str, tile: tuple[int, int, int, int], consts: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn  # the JITFunction under the autotuner
    bm, bn, warps, stages = tile
    consts = {**consts, "BLOCK_M": bm, "BLOCK_N": bn}
    sig = _signature(fn, dtype)
    for name in consts:
        sig[name] = "constexpr"
    # what the runtime infers for real tensors: aligned pointers, strides / lengths divisible by 16
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if sig[n] != "constexpr" and not n.endswith("mn")
        and (sig[n].startswith("*") or n.startswith("stride") or n in ("Lq", "Lk", "KEY_Q", "KEY_K"))
    }
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        Path(path).write_text(ptx)
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=False).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill_store_B": int(spill.group(1)) if spill else None,
        "spill_load_B": int(spill.group(2)) if spill else None,
        "smem_B": compiled.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "compile_s": round(time.time() - t0, 1),
    }


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_regs_report: unset TRITON_INTERPRET (this compiles for sm_90a)")
        return 2
    import torch
    import triton

    from parallax_compile.kernels import triton_parallax as tp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=128, help="head dim (= value dim)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--mask-kind", type=int, default=0, choices=[0, 1, 2])
    ap.add_argument("--kernels", nargs="*", default=["fwd", "dkv", "dq"])
    ap.add_argument("--only", nargs="*", help="tiles BM,BN,WARPS,STAGES instead of the bucket's list")
    ap.add_argument("--fwd-variant", default="base", help="a name in triton_parallax.FWD_VARIANTS")
    ap.add_argument("--bwd-variant", default="base", help="a name in triton_parallax.BWD_VARIANTS")
    args = ap.parse_args(argv)
    fv = tp.resolve_variant(args.fwd_variant, "fwd", args.d, args.d, 4096)
    bv = tp.resolve_variant(args.bwd_variant, "bwd", args.d, args.d, 4096)
    block = tp._block(args.d)
    block_dv = 128 if fv.split_dv and args.d > 128 else block
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    consts = {"D": args.d, "DV": args.d, "BLOCK_D": block, "BLOCK_DV": block, "CAUSAL": not args.no_causal,
              "HAS_WINDOW": False, "MASK_KIND": args.mask_kind, "IS_VARLEN": False,
              "PREC": "ieee" if args.dtype == "fp32" else "tf32", "UPCAST": False}
    per_kernel = {
        "fwd": {"PRESCALE": args.mask_kind == 2, "LAZY_RESCALE": tp.LAZY_RESCALE, "TMA": fv.tma, "SCHED": fv.sched,
                "WS": fv.ws, "NSPLIT": -(-args.d // block_dv), "TILES": int(fv.tiles == "wide"), "BLOCK_DV": block_dv},
        "dkv": {"ATOMIC_DQ": bv.atomic_dq, "TILES": int(bv.tiles == "wide")},
        "dq": {"TILES": int(bv.tiles == "wide")},
    }
    kernels = {"fwd": tp.parallax_fwd_kernel, "dkv": tp.parallax_bwd_kernel_dkv, "dq": tp.parallax_bwd_kernel_dq}
    print(f"# triton {triton.__version__}, sm_90a, D={args.d} {args.dtype} fwd={args.fwd_variant} bwd={args.bwd_variant}")
    for name in args.kernels:
        extra = per_kernel[name]
        bucket = tp._bucket({**consts, **extra, "q": torch.empty(0, dtype=tdtype)}, name)
        tiles = [tuple(map(int, t.split(","))) for t in args.only] if args.only else tp._TILES[name][bucket]
        for tile in tiles:
            try:
                rep = compile_report(kernels[name], args.dtype, tile, {**consts, **extra})
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
                rep = f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"{name} BM{tile[0]} BN{tile[1]} w{tile[2]} s{tile[3]}: {rep}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
