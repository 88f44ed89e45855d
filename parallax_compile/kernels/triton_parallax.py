"""Fused Triton kernels for Parallax attention: forward, backward and a packed varlen entry point.

The math is SPEC sections 3 and 4; the outputs and statistics follow
:mod:`parallax_compile.kernels.chunked` exactly (same launcher signatures, same conventions):

* ``out``, ``mu_v = O1/d1``: ``[B, Hq, Lq, Dv]`` in the input dtype;
* ``lse = m + log(d1)`` (natural log, fp32) and ``c = d2/d1`` (fp32), ``[B, Hq, Lq]``; a row with no
  allowed key has ``lse = +inf``, ``c = 0`` and output 0 (never NaN);
* causal is aligned to the END of the keys (row ``i`` sees ``j <= i + Lk - Lq``), a window ``W``
  keeps ``j > i' - W`` (and ``j < i' + W`` when not causal) with ``i' = i + Lk - Lq``;
* GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``;
* ``scale`` multiplies ``q . k`` only, never the probe scores ``g = r . k``.

Kernels (fla / FlashAttention naming):

* :func:`parallax_fwd_kernel`: one streaming pass per ``BLOCK_M`` query rows. Online max from the
  softmax logits only, one rescale ``alpha`` for ``d1, d2, O1, O2``; four tile GEMMs ``QK^T``,
  ``RK^T``, ``PV``, ``(P*G)V`` with ``p`` and ``p*g`` cast to the input dtype only as GEMM operands,
  fp32 accumulators. Logits are kept in base 2 (``scale * log2(e)`` folded in, ``exp2``).
* :func:`parallax_bwd_preprocess`: per row ``dc = rowdot(dO, mu_v)`` and
  ``Dr = rowdot(dO, o) + c * dc`` (fp32).
* :func:`parallax_bwd_kernel_dkv`: one program per ``BLOCK_N`` keys of one KV head; loops over the
  query heads of its GQA group and over the query blocks that see the keys, so dK/dV are summed over
  the group in registers (no atomics). Six tile GEMMs per tile.
* :func:`parallax_bwd_kernel_dq`: one program per ``BLOCK_M`` query rows; loops over key blocks.
  Five tile GEMMs per tile (the recompute of ``s``, ``g``, ``dA`` is repeated, FA2-Triton style:
  no atomics, deterministic).

Nothing O(L^2) is saved: the backward recomputes ``s`` from ``lse`` and ``g`` from ``R K^T``.

Kernel variants (:class:`Variant`, named in ``FWD_VARIANTS`` / ``BWD_VARIANTS``, chosen per call
with ``variant=`` or per shape bucket by the ``DISPATCH`` table): TMA tensor-descriptor loads of
K / V, a heads-first or persistent (heaviest tile first) forward grid, a warp-specialised key loop,
value columns split over programs for head_dim > 128, larger tile lists, and a backward that adds
dQ / dR with fp32 atomics from the dK/dV kernel. They compute the same function (up to rounding
order); ``DISPATCH`` runs "base" (the kernels described above) until
``benchmarks/sweep_attention.py`` has measured the others.

Tile loops are split into key (or query) ranges that need the causal / window / bounds predicate
and a middle range of full tiles that skips it; tiles that no row can see are never visited.

Coverage (:func:`supports`): fp16 / bf16; fp32 runs with IEEE fp32 dots (tf32 off: correct to SPEC's
1e-5) but on the FMA units, slower than chunked's cuBLAS fp32, so ``supports`` sends fp32 on CUDA to
``chunked`` unless ``PARALLAX_TRITON_FP32=1`` (the launchers accept it either way); any head_dim up to 256
(non powers of two are padded to ``BLOCK_D`` with masks); any ``Lq``, ``Lk``; causal with
``Lq != Lk``; sliding windows; GQA / MQA; no mask or a key-padding mask (bool or additive,
broadcastable to ``[B, Hq, 1, Lk]``) loaded per key tile. Any other mask shape, a mask that needs a
gradient, or other devices/dtypes: ``supports`` is False and the caller uses ``chunked``.

Additive masks: ``-inf`` masks; other values are floored at ``2^-4096`` in base-2 units (exactly 0
weight in fp32 next to any normal key), and ``finfo.min``-style padding (<= -1e30) gives a row that
sees only such keys the reference's uniform weights, with ``lse = -4096 ln 2 + log n`` instead of
``finfo.min + log n`` (which fp32 cannot hold; the backward rebuilds the weights from it exactly).

Measured on an H200 (torch 2.11, triton 3.6, bf16, L2 flushed, ``benchmarks/bench_attention.py``),
B=4, H=32, L=4096, D=128, counting ``8*B*H*L*L*D/2`` forward FLOPs and 2x that for the backward:
causal forward 2.21-2.36 ms (466-497 TFLOP/s), backward 6.33-6.55 ms (336-347 TFLOP/s) (fla:
4.17 / 17.7 ms); non-causal 4.1-4.2 ms (521-535) / 11.6-11.8 ms (374-380). The bf16 GEMM ceiling
measured in the same runs: 682-696 TFLOP/s.

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) the module uses one small tile config and
upcasts bf16 GEMM operands to fp32 (Triton 3.7's interpreter multiplies bf16 as raw uint16).
The interpreter flag is read when ``triton`` is first imported: set it before that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "parallax_attention_varlen",
    "parallax_bwd",
    "parallax_bwd_kernel_dkv",
    "parallax_bwd_kernel_dq",
    "parallax_bwd_preprocess",
    "parallax_fwd",
    "parallax_fwd_kernel",
    "shape_bucket",
    "supports",
    "unsupported_reason",
    "DISPATCH",
    "FWD_VARIANTS",
    "BWD_VARIANTS",
    "Variant",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Set when this module is imported: the kernels below are decorated for the interpreter or for a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Debug mode: fill every fresh output allocation with NaN, so an element a kernel forgets to write
# cannot pass a test. Tests flip it; `PARALLAX_TRITON_POISON=1` turns it on from the environment.
POISON = os.environ.get("PARALLAX_TRITON_POISON", "0") not in ("", "0")
# Forward: `PARALLAX_TRITON_LAZY_RESCALE=1` rescales d1, d2, O1, O2 only when a row max grows by more
# than 2^8 (FlashAttention-4's conditional rescaling) instead of on every tile. Off by default: on an
# H200 (triton 3.6, bf16) it measured 1-7% slower (causal D128 L4096: 2.285 vs 2.263 ms; full:
# 4.15 vs 3.98 ms; D64 L2048: 0.442 vs 0.411 ms).
LAZY_RESCALE = os.environ.get("PARALLAX_TRITON_LAZY_RESCALE", "0") not in ("", "0")
# Backward dQ/dR: a separate dq kernel (deterministic, no atomics; 11 tile GEMMs per tile pair in
# all instead of 8). FA2-style fp32 atomics of dQ and dR from the dK/dV kernel would move about
# 2 * 4 * Lq * D bytes per key block (8.6 GB at B4 H32 L4096 D128 causal with BLOCK_N 128): not tried.

# `PARALLAX_TRITON_AUTOTUNE=0`: compile and run only the first config that fits (tests, quick runs).
AUTOTUNE = os.environ.get("PARALLAX_TRITON_AUTOTUNE", "1") not in ("", "0")

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp32 inputs run IEEE fp32 dots (tf32 off, SPEC section 5's 1e-5) on the FMA units with heavy
# register spills: measured on an H200 (B1 H8 L2048 D128 causal) forward 2.46 ms vs chunked's 2.32,
# backward 7.6 ms vs 4.2 (cuBLAS fp32). So `supports` sends fp32 on CUDA to chunked unless this is
# set; the launchers themselves accept fp32 (and the interpreter tests run it).
GPU_FP32 = os.environ.get("PARALLAX_TRITON_FP32", "0") not in ("", "0")
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Autotune configurations
# ---------------------------------------------------------------------------------------------


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and per head-dim bucket, picked
# on an H200 (triton 3.6, benchmarks/tune_triton_parallax.py) and by ptxas register / spill reports
# (sm_90a). Forward: O1 and O2 are two [BLOCK_M, Dv] fp32 accumulators and S, G two
# [BLOCK_M, BLOCK_N] fp32 tiles, so at D=128 BLOCK_M 128 x BLOCK_N 64 with 8 warps (two
# warpgroups of 64 rows) is the register sweet spot (B4 H32 L4096 causal bf16: 2.31 ms,
# 477-497 TFLOP/s; backward dkv 32x128 w8 s3 + dq 128x64 w8 s3: 6.3 ms, 347 TFLOP/s). dK/dV: BLOCK_N keys per program (dK, dV [BLOCK_N, D] fp32), BLOCK_M queries per
# step, computed transposed; dQ/dR: BLOCK_M queries per program, BLOCK_N keys per step.
# "big" is head_dim > 128 (B4 H8 L4096 D256 causal: forward 2.9-3.1 ms ~180 TFLOP/s, backward 9.8 ms
# ~112 TFLOP/s: the fp32 dK/dV/dQ/dR accumulators of 256 columns spill); "fp32" is fp32 inputs (IEEE
# fp32 dots on the FMA units, no tensor-core tf32; small tiles that fit any head dim).
# Buckets ending in "+wide" are the larger candidate lists of the variants with ``tiles="wide"``
# (see VARIANTS; not measured yet: benchmarks/sweep_attention.py); "split" is the forward with the
# value columns split over programs (head_dim > 128, BLOCK_DV 128); "atomic" the dK/dV kernel that
# also adds dQ/dR with fp32 atomics.
_TILES = {
    "fwd": {
        "d64": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
        "d128": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)],
        "big": [(64, 32, 8, 1), (64, 64, 8, 2), (64, 32, 8, 2)],
        "fp32": [(32, 32, 4, 1), (64, 32, 8, 2)],
        # ptxas (triton 3.7.1, D256 bf16 causal): 128x32 w8 s2 spills 44 B, 128x64 548 B; "big"'s 64x32 324 B
        "split": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2)],
        "d64+wide": [(128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 4, 3), (64, 64, 4, 4)],
        "d128+wide": [(128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 4, 2)],
        "big+wide": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 3)],
    },
    "dkv": {
        "d64": [(16, 128, 8, 2), (32, 128, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)],
        "d128": [(32, 128, 8, 3), (32, 128, 8, 2), (16, 64, 4, 3), (16, 128, 8, 2)],
        "big": [(16, 32, 4, 1), (32, 32, 8, 1), (32, 64, 8, 2)],
        "fp32": [(16, 32, 4, 1), (16, 32, 8, 1)],
        # ptxas (triton 3.7.1, D128 bf16 causal): 16x128 w8 s2 spills 580 B, 32x128 1520 B (base 32x128: 452 B)
        "atomic": [(16, 128, 8, 2), (32, 128, 8, 2), (32, 128, 8, 1)],
        "d64+wide": [(64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 4, 2), (64, 64, 4, 2)],
        "d128+wide": [(64, 128, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 4)],
        "big+wide": [(16, 64, 4, 2), (32, 64, 8, 1), (16, 128, 8, 1), (32, 32, 4, 2)],
    },
    "dq": {
        "d64": [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2)],
        "d128": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2)],
        "big": [(32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 8, 1)],
        "fp32": [(32, 32, 4, 1), (32, 32, 4, 2)],
        "d64+wide": [(128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
        "d128+wide": [(128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 2)],
        "big+wide": [(64, 32, 8, 2), (16, 64, 4, 2), (64, 64, 8, 2), (32, 32, 8, 2)],
    },
}
# The interpreter costs about 1 ms per program instance and tile iteration: one small config.
_INTERPRET_TILE = (16, 16, 4, 1)


def _configs(kernel: str) -> list[triton.Config]:
    if INTERPRET:
        return [_cfg(*_INTERPRET_TILE)]
    seen, out = set(), []
    for tiles in _TILES[kernel].values():
        for t in tiles:
            if t not in seen:
                seen.add(t)
                out.append(_cfg(*t))
    return out


def _bucket(args: dict, kernel: str = "fwd") -> str:
    """Tile list of ``_TILES[kernel]`` for these launch arguments (head dim, dtype, variant flags)."""
    d = max(args["BLOCK_D"], args["BLOCK_DV"])
    if args["q"].dtype == torch.float32:
        return "fp32"
    if kernel == "fwd" and args.get("NSPLIT", 1) > 1:
        return "split"
    if kernel == "dkv" and args.get("ATOMIC_DQ", False):
        return "atomic"
    base = "big" if d > 128 else ("d64" if d <= 64 else "d128")
    return base + "+wide" if args.get("TILES", 0) == 1 else base


def _pruner(kernel: str):
    """``early_config_prune`` for ``kernel``: the configs of the head-dim / variant bucket, in its order
    (only the first with ``PARALLAX_TRITON_AUTOTUNE=0``). Under the interpreter there is one config."""

    def prune(configs, named_args, **kwargs):
        if len(configs) <= 1:
            return configs
        want = _TILES[kernel][_bucket({**named_args, **kwargs}, kernel)]
        by_tile = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
        keep = [by_tile[t] for t in want if t in by_tile]
        return keep if AUTOTUNE else keep[:1]

    return prune


# The autotuner caches its pick per value of these arguments (variant flags included: a constexpr
# left out of the key would share one tile pick between variants).
_AUTOTUNE_KEY = ["KEY_Q", "KEY_K", "BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_WINDOW", "MASK_KIND", "TILES"]
_FWD_KEY = _AUTOTUNE_KEY + ["TMA", "SCHED", "WS", "NSPLIT"]
_DKV_KEY = _AUTOTUNE_KEY + ["ATOMIC_DQ"]


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32. ``UPCAST``: multiply in fp32 (interpreter bf16 workaround)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_rows(p, o_r, n_r, o_c, N_C: tl.constexpr, BLOCK_C: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a ``[R, BLOCK_C]`` tile; rows ``>= n_r`` (when ``CHECK_ROWS``) and columns ``>= N_C``
    (when padded) read as 0."""
    if CHECK_ROWS:
        if BLOCK_C != N_C:
            x = tl.load(p, mask=(o_r < n_r)[:, None] & (o_c < N_C)[None, :], other=0.0)
        else:
            x = tl.load(p, mask=(o_r < n_r)[:, None], other=0.0)
    else:
        if BLOCK_C != N_C:
            x = tl.load(p, mask=(o_c < N_C)[None, :], other=0.0)
        else:
            x = tl.load(p)
    return x


# Additive masks in base-2 logit units: finite values are floored at MASK_FLOOR (2^-4096 is 0 in
# fp32, so a floored key gets exactly the zero weight that ``finfo.min`` padding gets in the reference
# wherever the row sees a normal key), and ``finfo.min``-style padding (<= -1e30, where ``l + mask``
# drops ``l`` in fp32 and fp64 alike) becomes the tag HUGE_TAG: its logit is MASK_FLOOR exactly, so a
# row that sees only such keys gets the reference's uniform weights with an lse (about
# MASK_FLOOR * ln 2 + log n) that keeps log n, which the backward needs to rebuild the weights.
MASK_FLOOR = tl.constexpr(-4096.0)
MASK_HUGE = tl.constexpr(-1e30)
HUGE_TAG = tl.constexpr(-3.0e38)


@triton.jit
def _mask_log2(b_mk):
    """Additive mask values in base-2 logit units: ``-inf`` stays ``-inf``, values <= MASK_HUGE
    become HUGE_TAG, others ``max(b * log2(e), MASK_FLOOR)``. Use with :func:`_add_mask`."""
    b_mk = b_mk.to(tl.float32)
    b2 = tl.maximum(tl.maximum(b_mk, -1e38) * 1.4426950408889634, MASK_FLOOR)
    b2 = tl.where(b_mk <= MASK_HUGE, HUGE_TAG, b2)
    return tl.where(b_mk == float("-inf"), float("-inf"), b2)


@triton.jit
def _add_mask(s, b2, base):
    """``s + b2`` for base-2 logits ``s`` (already minus ``base``, the row's base-2 lse in the
    backward, 0 in the forward) and :func:`_mask_log2` values ``b2`` (broadcast by the caller);
    a HUGE_TAG key's logit is MASK_FLOOR, independent of ``s``."""
    return tl.where(b2 == HUGE_TAG, MASK_FLOOR - base, s + b2)


@triton.jit
def _allowed(i, j, seq_q, seq_k, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query row ``i``, key ``j``) pairs are allowed (broadcast ``i`` against ``j``):
    in bounds, causal aligned to the end of the keys, sliding window (SPEC section 5)."""
    pos = i + (seq_k - seq_q)
    keep = (i < seq_q) & (j < seq_k)
    if CAUSAL:
        keep = keep & (j <= pos)
    if HAS_WINDOW:
        keep = keep & (j > pos - WINDOW)
        if not CAUSAL:
            keep = keep & (j < pos + WINDOW)
    return keep


@triton.jit
def _key_range(m0, seq_q, seq_k, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key tiles seen by query rows ``[m0, m0 + BLOCK_M)``, as tile starts ``[lo, f_lo)`` (needs the
    predicate), ``[f_lo, f_hi)`` (full: every pair allowed), ``[f_hi, hi)`` (needs the predicate)."""
    off = seq_k - seq_q
    m1 = tl.minimum(m0 + BLOCK_M, seq_q)  # last valid row + 1
    lo = m0 * 0
    hi = m0 * 0 + seq_k
    f_lo = m0 * 0
    f_hi = m0 * 0 + seq_k
    if CAUSAL:
        hi = tl.minimum(hi, m1 + off)
        f_hi = tl.minimum(f_hi, m0 + off + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, m0 + off - WINDOW + 1)
        f_lo = tl.maximum(f_lo, m0 + BLOCK_M + off - WINDOW)
        if not CAUSAL:
            hi = tl.minimum(hi, m1 - 1 + off + WINDOW)
            f_hi = tl.minimum(f_hi, m0 + off + WINDOW)
    hi = tl.maximum(hi, 0)
    lo = (lo // BLOCK_N) * BLOCK_N  # lo >= 0
    hi_t = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    f_lo = tl.minimum(tl.maximum(tl.cdiv(f_lo, BLOCK_N) * BLOCK_N, lo), hi_t)
    f_hi = (tl.maximum(f_hi, 0) // BLOCK_N) * BLOCK_N
    f_hi = tl.maximum(tl.minimum(f_hi, hi_t), f_lo)
    return lo, f_lo, f_hi, hi


@triton.jit
def _query_range(n0, seq_q, seq_k, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query tiles that see keys ``[n0, n0 + BLOCK_N)``: starts ``[lo, f_lo)`` masked, ``[f_lo, f_hi)``
    full, ``[f_hi, hi)`` masked (the transpose of :func:`_key_range`)."""
    off = seq_k - seq_q
    n1 = tl.minimum(n0 + BLOCK_N, seq_k)  # last valid key + 1
    lo = n0 * 0
    hi = n0 * 0 + seq_q
    f_lo = n0 * 0
    f_hi = n0 * 0 + seq_q
    if n0 + BLOCK_N > seq_k:  # partial key block: no full tiles
        f_hi = n0 * 0
    if CAUSAL:
        lo = tl.maximum(lo, n0 - off)
        f_lo = tl.maximum(f_lo, n0 + BLOCK_N - 1 - off)
    if HAS_WINDOW:
        hi = tl.minimum(hi, n1 - 1 - off + WINDOW)
        f_hi = tl.minimum(f_hi, n0 - off + WINDOW)
        if not CAUSAL:
            lo = tl.maximum(lo, n0 - off - WINDOW + 1)
            f_lo = tl.maximum(f_lo, n0 + BLOCK_N - off - WINDOW)
    hi = tl.maximum(hi, 0)
    lo = (tl.maximum(lo, 0) // BLOCK_M) * BLOCK_M
    hi_t = tl.cdiv(hi, BLOCK_M) * BLOCK_M
    f_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(f_lo, 0), BLOCK_M) * BLOCK_M, lo), hi_t)
    f_hi = (tl.maximum(f_hi, 0) // BLOCK_M) * BLOCK_M
    f_hi = tl.maximum(tl.minimum(f_hi, hi_t), f_lo)
    return lo, f_lo, f_hi, hi


@triton.jit
def _seq_bounds(i_b, cu_seqlens_q, cu_seqlens_k, Lq, Lk, IS_VARLEN: tl.constexpr):
    """Start offset (int64) and length of this batch element's query and key sequences."""
    if IS_VARLEN:
        bos_q = tl.load(cu_seqlens_q + i_b).to(tl.int64)
        seq_q = (tl.load(cu_seqlens_q + i_b + 1) - tl.load(cu_seqlens_q + i_b)).to(tl.int32)
        bos_k = tl.load(cu_seqlens_k + i_b).to(tl.int64)
        seq_k = (tl.load(cu_seqlens_k + i_b + 1) - tl.load(cu_seqlens_k + i_b)).to(tl.int32)
    else:
        bos_q = i_b.to(tl.int64) * 0
        seq_q = i_b * 0 + Lq
        bos_k = i_b.to(tl.int64) * 0
        seq_k = i_b * 0 + Lk
    return bos_q, seq_q, bos_k, seq_k


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _parallax_fwd_inner(
    b_q, b_r, b_m, b_d1, b_d2, b_o1, b_o2,
    p_kb, p_vb, p_mb, stride_kl, stride_vl, stride_mn,
    o_m, o_d, o_dv, lo, hi, seq_q, seq_k, WINDOW, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PRESCALE: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, TMA: tl.constexpr = False, WS: tl.constexpr = False, dv0=0,
):
    """SPEC section 3 over key tiles starting in ``[lo, hi)``. ``MASKED``: apply bounds / causal /
    window (tiles on a boundary); otherwise every pair is allowed. ``TMA``: ``p_kb`` / ``p_vb`` are
    tensor descriptors (``[seq_k, D]`` / ``[seq_k, DV]``, zero padded out of bounds) and ``dv0`` the
    first value column of this program; ``WS``: warp-specialised loop (Triton >= 3.4)."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        o_n = start_n + tl.arange(0, BLOCK_N)
        o_n64 = o_n.to(tl.int64)
        if TMA:
            b_k = p_kb.load([start_n, 0])  # [BN, BD]
            b_v = p_vb.load([start_n, dv0])  # [BN, BDV]
        else:
            p_k = p_kb + o_n64[:, None] * stride_kl + o_d[None, :]
            p_v = p_vb + o_n64[:, None] * stride_vl + o_dv[None, :]
            b_k = _load_rows(p_k, o_n, seq_k, o_d, D, BLOCK_D, MASKED)  # [BN, BD]
            b_v = _load_rows(p_v, o_n, seq_k, o_dv, DV, BLOCK_DV, MASKED)  # [BN, BDV]
        # logits in base 2: l * log2(e)
        # raw q.k; PRESCALE (additive mask or scale <= 0) scales it to base-2 logits here, otherwise the
        # row max is taken on the raw product and the scale folds into one FMA before exp2
        b_s = _dot(b_q, tl.trans(b_k), None, PREC, UPCAST)  # [BM, BN]
        b_g = _dot(b_r, tl.trans(b_k), None, PREC, UPCAST)  # [BM, BN], probe scores (not scaled)
        if PRESCALE:
            b_s = b_s * qk_scale
        if MASK_KIND == 1:
            b_mk = tl.load(p_mb + o_n64 * stride_mn, mask=o_n < seq_k, other=0)  # [BN]
            b_s = tl.where((b_mk != 0)[None, :], b_s, float("-inf"))
        elif MASK_KIND == 2:
            b_mk = _mask_log2(tl.load(p_mb + o_n64 * stride_mn, mask=o_n < seq_k, other=0.0))
            b_s = _add_mask(b_s, b_mk[None, :], 0.0)
        if MASKED:
            m_s = _allowed(o_m[:, None], o_n[None, :], seq_q, seq_k, WINDOW, CAUSAL, HAS_WINDOW)
            b_s = tl.where(m_s, b_s, float("-inf"))
        if PRESCALE:
            b_mt = tl.max(b_s, 1)  # [BM] tile row max, base-2 logits
        else:
            b_mt = tl.max(b_s, 1) * qk_scale  # qk_scale > 0
        if LAZY_RESCALE:
            # conditional rescale (FlashAttention-4): keep the stale max, so p <= 2^8, unless some row's
            # max grew by more than 8 (base 2); then rescale d1, d2, O1, O2 once for the whole block
            if tl.max((b_mt > b_m + 8.0).to(tl.int32), 0) > 0:
                b_mnew = tl.maximum(b_m, b_mt)
                b_alpha = tl.exp2(b_m - tl.where(b_mnew == float("-inf"), 0.0, b_mnew))  # [BM]
                b_d1 = b_d1 * b_alpha
                b_d2 = b_d2 * b_alpha
                b_o1 = b_o1 * b_alpha[:, None]
                b_o2 = b_o2 * b_alpha[:, None]
                b_m = b_mnew
            b_mref = tl.where(b_m == float("-inf"), 0.0, b_m)  # rows with no key yet
            if PRESCALE:
                b_p = tl.exp2(b_s - b_mref[:, None])  # [BM, BN]
            else:
                b_p = tl.exp2(b_s * qk_scale - b_mref[:, None])
            b_pg = b_p * b_g
            b_d1 = b_d1 + tl.sum(b_p, 1)
            b_d2 = b_d2 + tl.sum(b_pg, 1)
            b_o1 = _dot(b_p.to(b_v.dtype), b_v, b_o1, PREC, UPCAST)  # [BM, BDV]
            b_o2 = _dot(b_pg.to(b_v.dtype), b_v, b_o2, PREC, UPCAST)  # [BM, BDV]
        else:
            b_mnew = tl.maximum(b_m, b_mt)
            b_mref = tl.where(b_mnew == float("-inf"), 0.0, b_mnew)  # rows with no key yet
            if PRESCALE:
                b_p = tl.exp2(b_s - b_mref[:, None])  # [BM, BN]
            else:
                b_p = tl.exp2(b_s * qk_scale - b_mref[:, None])
            b_alpha = tl.exp2(b_m - b_mref)  # [BM]
            b_pg = b_p * b_g
            b_d1 = b_d1 * b_alpha + tl.sum(b_p, 1)
            b_d2 = b_d2 * b_alpha + tl.sum(b_pg, 1)
            b_o1 = _dot(b_p.to(b_v.dtype), b_v, b_o1 * b_alpha[:, None], PREC, UPCAST)  # [BM, BDV]
            b_o2 = _dot(b_pg.to(b_v.dtype), b_v, b_o2 * b_alpha[:, None], PREC, UPCAST)  # [BM, BDV]
            b_m = b_mnew
    return b_m, b_d1, b_d2, b_o1, b_o2


@triton.jit
def _parallax_fwd_tile(
    i_m, i_v, i_b, bos_q, seq_q, bos_k, seq_k,
    q, r, k, v, mask, o, mu, lse, c,
    stride_qb, stride_qh, stride_ql,
    stride_rb, stride_rh, stride_rl,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_sb, stride_sh, stride_sl,
    stride_mb, stride_mh, stride_mn,
    G, qk_scale, WINDOW,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, PRESCALE: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, NSPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One ``BLOCK_M`` query tile of query head ``i_v // NSPLIT``, value columns from
    ``(i_v % NSPLIT) * BLOCK_DV`` (``NSPLIT`` > 1 when the value dim is split over programs: each
    block repeats the QK^T, RK^T GEMMs; the first writes ``lse`` and ``c``)."""
    if NSPLIT == 1:
        i_h = i_v
        dv0 = 0
    else:
        i_h = i_v // NSPLIT
        dv0 = (i_v % NSPLIT) * BLOCK_DV
    i_hk = i_h // G
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_m64 = o_m.to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = dv0 + tl.arange(0, BLOCK_DV)
    i_b64, i_h64, i_hk64 = i_b.to(tl.int64), i_h.to(tl.int64), i_hk.to(tl.int64)

    p_q = q + i_b64 * stride_qb + i_h64 * stride_qh + (bos_q + o_m64)[:, None] * stride_ql + o_d[None, :]
    p_r = r + i_b64 * stride_rb + i_h64 * stride_rh + (bos_q + o_m64)[:, None] * stride_rl + o_d[None, :]
    b_q = _load_rows(p_q, o_m, seq_q, o_d, D, BLOCK_D, True)  # [BM, BD]
    b_r = _load_rows(p_r, o_m, seq_q, o_d, D, BLOCK_D, True)  # [BM, BD]
    p_kb = k + i_b64 * stride_kb + i_hk64 * stride_kh + bos_k * stride_kl
    p_vb = v + i_b64 * stride_vb + i_hk64 * stride_vh + bos_k * stride_vl
    p_mb = mask + i_b64 * stride_mb + i_h64 * stride_mh
    if TMA:  # K, V through the tensor-memory accelerator; out-of-bounds rows / columns read 0
        p_kb = tl.make_tensor_descriptor(p_kb, shape=[seq_k, D], strides=[stride_kl, 1],
                                         block_shape=[BLOCK_N, BLOCK_D])
        p_vb = tl.make_tensor_descriptor(p_vb, shape=[seq_k, DV], strides=[stride_vl, 1],
                                         block_shape=[BLOCK_N, BLOCK_DV])

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_d1 = tl.zeros([BLOCK_M], tl.float32)
    b_d2 = tl.zeros([BLOCK_M], tl.float32)
    b_o1 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    b_o2 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    lo, f_lo, f_hi, hi = _key_range(m0, seq_q, seq_k, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    b_m, b_d1, b_d2, b_o1, b_o2 = _parallax_fwd_inner(
        b_q, b_r, b_m, b_d1, b_d2, b_o1, b_o2, p_kb, p_vb, p_mb, stride_kl, stride_vl, stride_mn,
        o_m, o_d, o_dv, lo, f_lo, seq_q, seq_k, WINDOW, qk_scale,
        D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST, PRESCALE, LAZY_RESCALE,
        TMA, False, dv0)
    b_m, b_d1, b_d2, b_o1, b_o2 = _parallax_fwd_inner(
        b_q, b_r, b_m, b_d1, b_d2, b_o1, b_o2, p_kb, p_vb, p_mb, stride_kl, stride_vl, stride_mn,
        o_m, o_d, o_dv, f_lo, f_hi, seq_q, seq_k, WINDOW, qk_scale,
        D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST, PRESCALE, LAZY_RESCALE,
        TMA, WS, dv0)
    b_m, b_d1, b_d2, b_o1, b_o2 = _parallax_fwd_inner(
        b_q, b_r, b_m, b_d1, b_d2, b_o1, b_o2, p_kb, p_vb, p_mb, stride_kl, stride_vl, stride_mn,
        o_m, o_d, o_dv, f_hi, hi, seq_q, seq_k, WINDOW, qk_scale,
        D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST, PRESCALE, LAZY_RESCALE,
        TMA, False, dv0)

    # epilogue: mu_v = O1/d1, c = d2/d1, o = mu_v (1 + c) - O2/d1; empty rows -> 0, lse = +inf
    b_empty = b_m == float("-inf")  # [BM]
    b_inv = tl.where(b_empty, 0.0, 1.0 / tl.where(b_empty, 1.0, b_d1))
    b_mu = b_o1 * b_inv[:, None]  # [BM, BDV]
    b_c = b_d2 * b_inv  # [BM]
    b_out = b_mu * (1.0 + b_c)[:, None] - b_o2 * b_inv[:, None]
    b_lse = tl.where(b_empty, float("inf"), b_m * 0.6931471805599453 + tl.log(tl.where(b_empty, 1.0, b_d1)))

    m_m = o_m < seq_q
    m_o = m_m[:, None] & (o_dv < DV)[None, :]
    o_o = i_b64 * stride_ob + i_h64 * stride_oh + (bos_q + o_m64)[:, None] * stride_ol + o_dv[None, :]
    tl.store(o + o_o, b_out.to(o.dtype.element_ty), mask=m_o)
    tl.store(mu + o_o, b_mu.to(mu.dtype.element_ty), mask=m_o)
    o_s = i_b64 * stride_sb + i_h64 * stride_sh + (bos_q + o_m64) * stride_sl
    if NSPLIT == 1:
        tl.store(lse + o_s, b_lse, mask=m_m)
        tl.store(c + o_s, b_c, mask=m_m)
    else:
        tl.store(lse + o_s, b_lse, mask=m_m & (dv0 == 0))
        tl.store(c + o_s, b_c, mask=m_m & (dv0 == 0))


@triton.autotune(configs=_configs("fwd"), key=_FWD_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def parallax_fwd_kernel(
    q, r, k, v, mask, o, mu, lse, c, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_ql,
    stride_rb, stride_rh, stride_rl,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_sb, stride_sh, stride_sl,
    stride_mb, stride_mh, stride_mn,
    G, Lq, Lk, KEY_Q, KEY_K, qk_scale, WINDOW, HQ, NB,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, PRESCALE: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, TMA: tl.constexpr, SCHED: tl.constexpr, WS: tl.constexpr,
    NSPLIT: tl.constexpr, TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes ``o``, ``mu`` ``[.., Lq, DV]`` and ``lse``, ``c``. Tiles are (query block, query head x
    ``NSPLIT`` value-column blocks, batch), heaviest (last, under causal) query blocks first:

    * ``SCHED == 0``: grid ``(cdiv(Lq, BLOCK_M), HQ * NSPLIT, NB)``;
    * ``SCHED == 1``: grid ``(HQ * NSPLIT * NB, cdiv(Lq, BLOCK_M))``: heads vary fastest, so the
      hardware issues every head's heaviest block before any lighter one;
    * ``SCHED == 2``: persistent, grid ``(P,)``; program ``p`` runs tiles ``p, p + P, ..`` of the
      SCHED 1 order.
    """
    NV = HQ * NSPLIT
    if SCHED == 2:
        n_m = tl.cdiv(Lq, BLOCK_M)
        n_hb = NV * NB
        for tile in tl.range(tl.program_id(0), n_m * n_hb, tl.num_programs(0), warp_specialize=WS == 2):
            i_m = n_m - 1 - tile // n_hb
            i_v = tile % NV
            i_b = (tile % n_hb) // NV
            bos_q, seq_q, bos_k, seq_k = _seq_bounds(i_b, cu_seqlens_q, cu_seqlens_k, Lq, Lk, IS_VARLEN)
            if i_m * BLOCK_M < seq_q:
                _parallax_fwd_tile(
                    i_m, i_v, i_b, bos_q, seq_q, bos_k, seq_k,
                    q, r, k, v, mask, o, mu, lse, c,
                    stride_qb, stride_qh, stride_ql, stride_rb, stride_rh, stride_rl,
                    stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                    stride_ob, stride_oh, stride_ol, stride_sb, stride_sh, stride_sl,
                    stride_mb, stride_mh, stride_mn, G, qk_scale, WINDOW,
                    D, DV, BLOCK_D, BLOCK_DV, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST, PRESCALE,
                    LAZY_RESCALE, TMA, WS == 1, NSPLIT, BLOCK_M, BLOCK_N)
    else:
        if SCHED == 1:
            i_m = tl.num_programs(1) - 1 - tl.program_id(1)
            i_v = tl.program_id(0) % NV
            i_b = tl.program_id(0) // NV
        else:
            i_m = tl.num_programs(0) - 1 - tl.program_id(0)
            i_v, i_b = tl.program_id(1), tl.program_id(2)
        bos_q, seq_q, bos_k, seq_k = _seq_bounds(i_b, cu_seqlens_q, cu_seqlens_k, Lq, Lk, IS_VARLEN)
        if IS_VARLEN:  # noqa: SIM102 (constexpr test, then a runtime one: Triton cannot `and` them)
            if i_m * BLOCK_M >= seq_q:
                return
        _parallax_fwd_tile(
            i_m, i_v, i_b, bos_q, seq_q, bos_k, seq_k,
            q, r, k, v, mask, o, mu, lse, c,
            stride_qb, stride_qh, stride_ql, stride_rb, stride_rh, stride_rl,
            stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
            stride_ob, stride_oh, stride_ol, stride_sb, stride_sh, stride_sl,
            stride_mb, stride_mh, stride_mn, G, qk_scale, WINDOW,
            D, DV, BLOCK_D, BLOCK_DV, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST, PRESCALE,
            LAZY_RESCALE, TMA, WS == 1, NSPLIT, BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def parallax_bwd_preprocess(
    do, o, mu, c, dc, dr,
    stride_ob, stride_oh, stride_ol,
    stride_sb, stride_sh, stride_sl,
    cu_seqlens_q, Lq,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Per row: ``dc = rowdot(dO, mu_v)``, ``Dr = rowdot(dO, o) + c * dc`` (fp32). Grid
    ``(cdiv(Lq, BLOCK_M), Hq, B)``; ``do``, ``o``, ``mu`` share strides."""
    i_m, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos_q, seq_q, _, _ = _seq_bounds(i_b, cu_seqlens_q, cu_seqlens_q, Lq, Lq, IS_VARLEN)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_m64 = o_m.to(tl.int64)
    o_dv = tl.arange(0, BLOCK_DV)
    i_b64, i_h64 = i_b.to(tl.int64), i_h.to(tl.int64)
    m_m = o_m < seq_q
    m_o = m_m[:, None] & (o_dv < DV)[None, :]
    o_o = i_b64 * stride_ob + i_h64 * stride_oh + (bos_q + o_m64)[:, None] * stride_ol + o_dv[None, :]
    b_do = tl.load(do + o_o, mask=m_o, other=0.0).to(tl.float32)  # [BM, BDV]
    b_o = tl.load(o + o_o, mask=m_o, other=0.0).to(tl.float32)
    b_mu = tl.load(mu + o_o, mask=m_o, other=0.0).to(tl.float32)
    o_s = i_b64 * stride_sb + i_h64 * stride_sh + (bos_q + o_m64) * stride_sl
    b_c = tl.load(c + o_s, mask=m_m, other=0.0)
    b_dc = tl.sum(b_do * b_mu, 1)  # [BM]
    b_dr = tl.sum(b_do * b_o, 1) + b_c * b_dc
    tl.store(dc + o_s, b_dc, mask=m_m)
    tl.store(dr + o_s, b_dr, mask=m_m)


@triton.jit
def _parallax_bwd_dkv_inner(
    b_dk, b_dv, b_k, b_v, b_mk,
    p_qb, p_rb, p_dob, p_sb, lse, c, dc, dr,
    stride_ql, stride_rl, stride_ol, stride_sl,
    o_n, o_d, o_dv, lo, hi, seq_q, seq_k, WINDOW, qk_scale, scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ATOMIC_DQ: tl.constexpr = False, p_aqb=None, p_arb=None, stride_al=0,
):
    """SPEC section 4 over query tiles starting in ``[lo, hi)``, computed transposed (keys as rows):
    ``dV += A^T dO``, ``dK += tau dS^T Q + dG^T R``. ``ATOMIC_DQ``: also add ``tau dS K`` and
    ``dG K`` of these keys into the fp32 rows ``p_aqb`` / ``p_arb`` (stride ``stride_al``) with
    atomics (FlashAttention-2's backward: no separate dQ kernel, not deterministic)."""
    for start_m in range(lo, hi, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        o_m64 = o_m.to(tl.int64)
        b_q = _load_rows(p_qb + o_m64[:, None] * stride_ql + o_d[None, :], o_m, seq_q, o_d, D, BLOCK_D, MASKED)
        b_r = _load_rows(p_rb + o_m64[:, None] * stride_rl + o_d[None, :], o_m, seq_q, o_d, D, BLOCK_D, MASKED)
        b_do = _load_rows(p_dob + o_m64[:, None] * stride_ol + o_dv[None, :], o_m, seq_q, o_dv, DV, BLOCK_DV, MASKED)
        p_s = p_sb + o_m64 * stride_sl
        if MASKED:
            m_m = o_m < seq_q
            b_lse = tl.load(lse + p_s, mask=m_m, other=float("inf"))  # [BM]
            b_c = tl.load(c + p_s, mask=m_m, other=0.0)
            b_dc = tl.load(dc + p_s, mask=m_m, other=0.0)
            b_dr = tl.load(dr + p_s, mask=m_m, other=0.0)
        else:
            b_lse = tl.load(lse + p_s)
            b_c = tl.load(c + p_s)
            b_dc = tl.load(dc + p_s)
            b_dr = tl.load(dr + p_s)
        b_c1 = 1.0 + b_c  # [BM]
        # base-2 logit minus base-2 lse (one FMA), then the masks
        b_lse2 = b_lse * 1.4426950408889634
        b_st = _dot(b_k, tl.trans(b_q), None, PREC, UPCAST) * qk_scale - b_lse2[None, :]
        if MASK_KIND == 1:
            b_st = tl.where((b_mk != 0)[:, None], b_st, float("-inf"))
        elif MASK_KIND == 2:  # s <= 1 against rounding of lse
            b_st = tl.minimum(_add_mask(b_st, b_mk[:, None], b_lse2[None, :]), 0.0)
        if MASKED:
            m_st = _allowed(o_m[None, :], o_n[:, None], seq_q, seq_k, WINDOW, CAUSAL, HAS_WINDOW)
            b_st = tl.where(m_st, b_st, float("-inf"))
        b_st = tl.exp2(b_st)  # s^T [BN, BM]
        b_gt = _dot(b_k, tl.trans(b_r), None, PREC, UPCAST)  # g^T [BN, BM]
        b_dat = _dot(b_v, tl.trans(b_do), None, PREC, UPCAST)  # dA^T [BN, BM]
        b_at = b_st * (b_c1[None, :] - b_gt)  # A^T = s (1 + c - g)
        b_dv = _dot(b_at.to(b_do.dtype), b_do, b_dv, PREC, UPCAST)  # [BN, BDV]
        # dP - Dr = dA (1 + c - g) + dc g - Dr = dA (1 + c) - Dr + g (dc - dA)
        b_ut = b_dc[None, :] - b_dat
        b_dst = (b_st * scale) * (b_dat * b_c1[None, :] - b_dr[None, :] + b_gt * b_ut)  # tau dS^T
        b_dgt = b_st * b_ut  # dG^T
        b_dk = _dot(b_dst.to(b_q.dtype), b_q, b_dk, PREC, UPCAST)  # [BN, BD]
        b_dk = _dot(b_dgt.to(b_r.dtype), b_r, b_dk, PREC, UPCAST)
        if ATOMIC_DQ:
            b_dqp = _dot(tl.trans(b_dst.to(b_k.dtype)), b_k, None, PREC, UPCAST)  # tau dS K [BM, BD]
            b_drp = _dot(tl.trans(b_dgt.to(b_k.dtype)), b_k, None, PREC, UPCAST)  # dG K [BM, BD]
            o_a = o_m64[:, None] * stride_al + o_d[None, :]
            m_a = (o_m < seq_q)[:, None] & (o_d < D)[None, :]
            tl.atomic_add(p_aqb + o_a, b_dqp, mask=m_a, sem="relaxed")
            tl.atomic_add(p_arb + o_a, b_drp, mask=m_a, sem="relaxed")
    return b_dk, b_dv


@triton.autotune(configs=_configs("dkv"), key=_DKV_KEY, prune_configs_by={"early_config_prune": _pruner("dkv")})
@triton.jit
def parallax_bwd_kernel_dkv(
    q, r, k, v, mask, do, lse, c, dc, dr, dk, dv, dq_acc, dr_acc, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_ql,
    stride_rb, stride_rh, stride_rl,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_sb, stride_sh, stride_sl,
    stride_mb, stride_mh, stride_mn,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    stride_ab, stride_ah, stride_al,
    G, Lq, Lk, KEY_Q, KEY_K, qk_scale, scale, WINDOW,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(Lk, BLOCK_N), Hkv, B)``: dK, dV of ``BLOCK_N`` keys of one KV head, summed over
    the ``G`` query heads of its group. ``do`` has the strides of ``out``. ``ATOMIC_DQ``: also adds
    dQ (scaled) and dR into the zeroed fp32 ``dq_acc``, ``dr_acc`` (strides ``stride_a*``)."""
    i_n, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos_q, seq_q, bos_k, seq_k = _seq_bounds(i_b, cu_seqlens_q, cu_seqlens_k, Lq, Lk, IS_VARLEN)
    n0 = i_n * BLOCK_N
    if IS_VARLEN:  # noqa: SIM102 (constexpr test, then a runtime one: Triton cannot `and` them)
        if n0 >= seq_k:
            return

    o_n = n0 + tl.arange(0, BLOCK_N)
    o_n64 = o_n.to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    i_b64, i_hk64 = i_b.to(tl.int64), i_hk.to(tl.int64)
    p_k = k + i_b64 * stride_kb + i_hk64 * stride_kh + (bos_k + o_n64)[:, None] * stride_kl + o_d[None, :]
    p_v = v + i_b64 * stride_vb + i_hk64 * stride_vh + (bos_k + o_n64)[:, None] * stride_vl + o_dv[None, :]
    b_k = _load_rows(p_k, o_n, seq_k, o_d, D, BLOCK_D, True)  # [BN, BD]
    b_v = _load_rows(p_v, o_n, seq_k, o_dv, DV, BLOCK_DV, True)  # [BN, BDV]
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    lo, f_lo, f_hi, hi = _query_range(n0, seq_q, seq_k, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for i_g in range(G):
        i_h64 = i_hk64 * G + i_g
        p_qb = q + i_b64 * stride_qb + i_h64 * stride_qh + bos_q * stride_ql
        p_rb = r + i_b64 * stride_rb + i_h64 * stride_rh + bos_q * stride_rl
        p_dob = do + i_b64 * stride_ob + i_h64 * stride_oh + bos_q * stride_ol
        p_sb = i_b64 * stride_sb + i_h64 * stride_sh + bos_q * stride_sl
        p_aqb = dq_acc + i_b64 * stride_ab + i_h64 * stride_ah + bos_q * stride_al
        p_arb = dr_acc + i_b64 * stride_ab + i_h64 * stride_ah + bos_q * stride_al
        if MASK_KIND == 1:
            b_mk = tl.load(mask + i_b64 * stride_mb + i_h64 * stride_mh + o_n64 * stride_mn, mask=o_n < seq_k, other=0)
        elif MASK_KIND == 2:
            b_mk = _mask_log2(tl.load(mask + i_b64 * stride_mb + i_h64 * stride_mh + o_n64 * stride_mn,
                                      mask=o_n < seq_k, other=0.0))
        else:
            b_mk = o_n * 0
        b_dk, b_dv = _parallax_bwd_dkv_inner(
            b_dk, b_dv, b_k, b_v, b_mk, p_qb, p_rb, p_dob, p_sb, lse, c, dc, dr,
            stride_ql, stride_rl, stride_ol, stride_sl, o_n, o_d, o_dv, lo, f_lo, seq_q, seq_k, WINDOW,
            qk_scale, scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, True, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST,
            ATOMIC_DQ, p_aqb, p_arb, stride_al)
        b_dk, b_dv = _parallax_bwd_dkv_inner(
            b_dk, b_dv, b_k, b_v, b_mk, p_qb, p_rb, p_dob, p_sb, lse, c, dc, dr,
            stride_ql, stride_rl, stride_ol, stride_sl, o_n, o_d, o_dv, f_lo, f_hi, seq_q, seq_k, WINDOW,
            qk_scale, scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, False, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST,
            ATOMIC_DQ, p_aqb, p_arb, stride_al)
        b_dk, b_dv = _parallax_bwd_dkv_inner(
            b_dk, b_dv, b_k, b_v, b_mk, p_qb, p_rb, p_dob, p_sb, lse, c, dc, dr,
            stride_ql, stride_rl, stride_ol, stride_sl, o_n, o_d, o_dv, f_hi, hi, seq_q, seq_k, WINDOW,
            qk_scale, scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, True, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST,
            ATOMIC_DQ, p_aqb, p_arb, stride_al)

    m_n = o_n < seq_k
    p_dk = dk + i_b64 * stride_dkb + i_hk64 * stride_dkh + (bos_k + o_n64)[:, None] * stride_dkl + o_d[None, :]
    p_dv = dv + i_b64 * stride_dvb + i_hk64 * stride_dvh + (bos_k + o_n64)[:, None] * stride_dvl + o_dv[None, :]
    tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_n[:, None] & (o_d < D)[None, :])
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None] & (o_dv < DV)[None, :])


@triton.jit
def _parallax_bwd_dq_inner(
    b_dq, b_dr, b_q, b_r, b_do, b_lse2, b_c, b_dc, b_dr_row,
    p_kb, p_vb, p_mb, stride_kl, stride_vl, stride_mn,
    o_m, o_d, o_dv, lo, hi, seq_q, seq_k, WINDOW, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """SPEC section 4 over key tiles starting in ``[lo, hi)``: ``dQ += dS K`` (tau applied by the
    caller), ``dR += dG K``."""
    for start_n in range(lo, hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        o_n64 = o_n.to(tl.int64)
        b_k = _load_rows(p_kb + o_n64[:, None] * stride_kl + o_d[None, :], o_n, seq_k, o_d, D, BLOCK_D, MASKED)
        b_v = _load_rows(p_vb + o_n64[:, None] * stride_vl + o_dv[None, :], o_n, seq_k, o_dv, DV, BLOCK_DV, MASKED)
        b_s = _dot(b_q, tl.trans(b_k), None, PREC, UPCAST) * qk_scale - b_lse2[:, None]  # [BM, BN]
        if MASK_KIND == 1:
            b_mk = tl.load(p_mb + o_n64 * stride_mn, mask=o_n < seq_k, other=0)
            b_s = tl.where((b_mk != 0)[None, :], b_s, float("-inf"))
        elif MASK_KIND == 2:  # s <= 1 (see the dkv kernel)
            b_mk = _mask_log2(tl.load(p_mb + o_n64 * stride_mn, mask=o_n < seq_k, other=0.0))
            b_s = tl.minimum(_add_mask(b_s, b_mk[None, :], b_lse2[:, None]), 0.0)
        if MASKED:
            m_s = _allowed(o_m[:, None], o_n[None, :], seq_q, seq_k, WINDOW, CAUSAL, HAS_WINDOW)
            b_s = tl.where(m_s, b_s, float("-inf"))
        b_s = tl.exp2(b_s)  # s [BM, BN]
        b_g = _dot(b_r, tl.trans(b_k), None, PREC, UPCAST)  # [BM, BN]
        b_da = _dot(b_do, tl.trans(b_v), None, PREC, UPCAST)  # [BM, BN]
        # dP - Dr = dA (1 + c) - Dr + g (dc - dA); b_c holds 1 + c here
        b_u = b_dc[:, None] - b_da
        b_ds = b_s * (b_da * b_c[:, None] - b_dr_row[:, None] + b_g * b_u)
        b_dg = b_s * b_u
        b_dq = _dot(b_ds.to(b_k.dtype), b_k, b_dq, PREC, UPCAST)  # [BM, BD]
        b_dr = _dot(b_dg.to(b_k.dtype), b_k, b_dr, PREC, UPCAST)  # [BM, BD]
    return b_dq, b_dr


@triton.autotune(configs=_configs("dq"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit
def parallax_bwd_kernel_dq(
    q, r, k, v, mask, do, lse, c, dc, dr, dq, dres, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qh, stride_ql,
    stride_rb, stride_rh, stride_rl,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_sb, stride_sh, stride_sl,
    stride_mb, stride_mh, stride_mn,
    stride_dqb, stride_dqh, stride_dql,
    G, Lq, Lk, KEY_Q, KEY_K, qk_scale, scale, WINDOW,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_M), Hq, B)``: dQ and dR (``dres``) of ``BLOCK_M`` query rows; both
    share the strides ``stride_dq*``."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_h, i_b = tl.program_id(1), tl.program_id(2)
    i_hk = i_h // G
    bos_q, seq_q, bos_k, seq_k = _seq_bounds(i_b, cu_seqlens_q, cu_seqlens_k, Lq, Lk, IS_VARLEN)
    m0 = i_m * BLOCK_M
    if IS_VARLEN:  # noqa: SIM102 (constexpr test, then a runtime one: Triton cannot `and` them)
        if m0 >= seq_q:
            return

    o_m = m0 + tl.arange(0, BLOCK_M)
    o_m64 = o_m.to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    i_b64, i_h64, i_hk64 = i_b.to(tl.int64), i_h.to(tl.int64), i_hk.to(tl.int64)
    m_m = o_m < seq_q
    p_q = q + i_b64 * stride_qb + i_h64 * stride_qh + (bos_q + o_m64)[:, None] * stride_ql + o_d[None, :]
    p_r = r + i_b64 * stride_rb + i_h64 * stride_rh + (bos_q + o_m64)[:, None] * stride_rl + o_d[None, :]
    p_do = do + i_b64 * stride_ob + i_h64 * stride_oh + (bos_q + o_m64)[:, None] * stride_ol + o_dv[None, :]
    b_q = _load_rows(p_q, o_m, seq_q, o_d, D, BLOCK_D, True)  # [BM, BD]
    b_r = _load_rows(p_r, o_m, seq_q, o_d, D, BLOCK_D, True)  # [BM, BD]
    b_do = _load_rows(p_do, o_m, seq_q, o_dv, DV, BLOCK_DV, True)  # [BM, BDV]
    o_s = i_b64 * stride_sb + i_h64 * stride_sh + (bos_q + o_m64) * stride_sl
    b_lse2 = tl.load(lse + o_s, mask=m_m, other=float("inf")) * 1.4426950408889634  # [BM]
    b_c = 1.0 + tl.load(c + o_s, mask=m_m, other=0.0)  # 1 + c
    b_dc = tl.load(dc + o_s, mask=m_m, other=0.0)
    b_dr_row = tl.load(dr + o_s, mask=m_m, other=0.0)
    p_kb = k + i_b64 * stride_kb + i_hk64 * stride_kh + bos_k * stride_kl
    p_vb = v + i_b64 * stride_vb + i_hk64 * stride_vh + bos_k * stride_vl
    p_mb = mask + i_b64 * stride_mb + i_h64 * stride_mh
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    b_dr = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, f_lo, f_hi, hi = _key_range(m0, seq_q, seq_k, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    b_dq, b_dr = _parallax_bwd_dq_inner(
        b_dq, b_dr, b_q, b_r, b_do, b_lse2, b_c, b_dc, b_dr_row, p_kb, p_vb, p_mb, stride_kl, stride_vl,
        stride_mn, o_m, o_d, o_dv, lo, f_lo, seq_q, seq_k, WINDOW, qk_scale,
        D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST)
    b_dq, b_dr = _parallax_bwd_dq_inner(
        b_dq, b_dr, b_q, b_r, b_do, b_lse2, b_c, b_dc, b_dr_row, p_kb, p_vb, p_mb, stride_kl, stride_vl,
        stride_mn, o_m, o_d, o_dv, f_lo, f_hi, seq_q, seq_k, WINDOW, qk_scale,
        D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST)
    b_dq, b_dr = _parallax_bwd_dq_inner(
        b_dq, b_dr, b_q, b_r, b_do, b_lse2, b_c, b_dc, b_dr_row, p_kb, p_vb, p_mb, stride_kl, stride_vl,
        stride_mn, o_m, o_d, o_dv, f_hi, hi, seq_q, seq_k, WINDOW, qk_scale,
        D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, CAUSAL, HAS_WINDOW, MASK_KIND, PREC, UPCAST)

    m_o = m_m[:, None] & (o_d < D)[None, :]
    o_o = i_b64 * stride_dqb + i_h64 * stride_dqh + (bos_q + o_m64)[:, None] * stride_dql + o_d[None, :]
    tl.store(dq + o_o, (b_dq * scale).to(dq.dtype.element_ty), mask=m_o)
    tl.store(dres + o_o, b_dr.to(dres.dtype.element_ty), mask=m_o)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A kernel variant (performance only: every variant computes the same function).

    Forward fields: ``tma`` loads K / V through device-side tensor descriptors (TMA on Hopper; needs
    16-byte aligned rows, otherwise the launch falls back to pointer loads); ``sched`` 0 = grid
    ``(m, head, batch)``, 1 = grid with heads varying fastest (every head's heaviest causal block is
    issued first), 2 = persistent grid of ``persist`` programs per SM walking tiles heaviest first;
    ``ws`` 1 warp-specialises the unmasked key loop, 2 the persistent tile loop (``sched`` 2; how
    Triton's Hopper attention tutorial applies it) with ``tl.range(warp_specialize=True)``;
    ``split_dv`` splits value columns over programs in blocks of 128 when ``Dv > 128`` (the QK^T and
    RK^T GEMMs are repeated per block; keeps O1, O2 in registers at head_dim 256).
    Backward fields: ``atomic_dq`` computes dQ / dR in the dK/dV kernel with fp32 atomics and skips
    the dQ kernel (8 tile GEMMs per tile pair instead of 11; not deterministic).
    Both: ``tiles`` "" = the tuned tile lists, "wide" = larger candidate lists (``_TILES`` "+wide").
    """

    tma: bool = False
    sched: int = 0
    persist: int = 1
    ws: int = 0
    split_dv: bool = False
    atomic_dq: bool = False
    tiles: str = ""


# Named variants (benchmarks/sweep_attention.py times each; "base" is the measured default).
FWD_VARIANTS = {
    "base": Variant(),
    "tma": Variant(tma=True),
    "heads-first": Variant(sched=1),
    "persistent": Variant(sched=2),
    "persistent2": Variant(sched=2, persist=2),
    "tma-persistent": Variant(tma=True, sched=2),
    "tma-heads-first": Variant(tma=True, sched=1),
    "ws": Variant(ws=1),
    "tma-ws": Variant(tma=True, ws=1),
    "tma-persistent-ws": Variant(tma=True, sched=2, ws=2),
    "wide": Variant(tiles="wide"),
    "tma-wide": Variant(tma=True, tiles="wide"),
    "split-dv": Variant(split_dv=True),
    "tma-split-dv": Variant(tma=True, split_dv=True),
}
BWD_VARIANTS = {
    "base": Variant(),
    "wide": Variant(tiles="wide"),
    "atomic-dq": Variant(atomic_dq=True),
}

# Which variant runs per shape bucket (see :func:`shape_bucket`): (forward, backward) names. All
# "base" until benchmarks/sweep_attention.py has measured the others on the H200; edit this table
# from its "suggested DISPATCH" output. A bucket missing here runs "base".
DISPATCH: dict[str, tuple[str, str]] = {
    "d64-short": ("base", "base"),
    "d64-long": ("base", "base"),
    "d128-short": ("base", "base"),
    "d128-long": ("base", "base"),
    "d256-short": ("base", "base"),
    "d256-long": ("base", "base"),
}


def shape_bucket(head_dim: int, value_dim: int, seq_q: int) -> str:
    """DISPATCH key: ``d64`` / ``d128`` / ``d256`` by the larger of ``head_dim`` and ``value_dim``,
    ``short`` for ``seq_q <= 1024`` (too few key tiles per query block to hide the prologue),
    ``long`` otherwise."""
    d = max(head_dim, value_dim)
    name = "d64" if d <= 64 else ("d128" if d <= 128 else "d256")
    return f"{name}-{'short' if seq_q <= 1024 else 'long'}"


def resolve_variant(variant: str | Variant | None, direction: str, head_dim: int, value_dim: int,
                    seq_q: int) -> Variant:
    """The :class:`Variant` to run: ``variant`` itself, a name in ``FWD_VARIANTS`` / ``BWD_VARIANTS``
    (``direction`` "fwd" / "bwd"), or ``None`` for the DISPATCH table's pick for this shape.

    Raises ValueError for an unknown name."""
    if isinstance(variant, Variant):
        return variant
    table = FWD_VARIANTS if direction == "fwd" else BWD_VARIANTS
    if variant is None:
        pick = DISPATCH.get(shape_bucket(head_dim, value_dim, seq_q), ("base", "base"))
        variant = pick[0] if direction == "fwd" else pick[1]
    if variant not in table:
        raise ValueError(f"variant: expected one of {sorted(table)} for the {direction} kernels, got {variant!r}")
    return table[variant]


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if INTERPRET:
        return 3  # a few programs, so the persistent loop runs several tiles each in the tests
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


_ALLOCATOR_SET = False


def _tma_ready(*ts: Tensor) -> bool:
    """Device-side tensor descriptors for ``ts``: base 16-byte aligned, unit last stride, other
    strides multiples of 16 bytes (the TMA rules). Sets Triton's scratch allocator (descriptors are
    written to global memory) on first use."""
    global _ALLOCATOR_SET
    for t in ts:
        item = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * item) % 16 for st in t.stride()[:-1]):
            return False
    if not INTERPRET and not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True
    return True


def _device_ok(t: Tensor) -> bool:
    return t.device.type == "cpu" if INTERPRET else t.device.type == "cuda"


def _key_padding_mask(attn_mask: Tensor, b: int, hq: int, lq: int, lk: int) -> Tensor | None:
    """``attn_mask`` as a ``[B, Hq, 1, Lk]`` view (stride 0 where it broadcasts) when it is a
    key-padding mask (constant over query rows); ``None`` otherwise."""
    if attn_mask.dim() > 4:
        return None
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.shape[2] != 1 and lq != 1:
        return None
    if m.shape[0] not in (1, b) or m.shape[1] not in (1, hq) or m.shape[3] not in (1, lk):
        return None
    return m[:, :, :1].expand(b, hq, 1, lk)


def unsupported_reason(
    q: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
    mask_needs_grad: bool = False,
) -> str | None:
    """Why the Triton kernels cannot run these arguments (``None`` when they can). Arguments are
    those of ``torch.ops.parallax.attention``; ``mask_needs_grad`` those of its backward."""
    ts = (q, r, k, v)
    if any(not isinstance(t, Tensor) for t in ts):
        return "inputs must be tensors"
    if any(t.dim() != 4 for t in ts):
        return "inputs must be [B, H, L, D]"
    if not all(_device_ok(t) for t in ts):
        return "tensors must be on CUDA" + (" (CPU under TRITON_INTERPRET=1)" if INTERPRET else "")
    if q.dtype not in _SUPPORTED_DTYPES or any(t.dtype != q.dtype for t in ts):
        return f"dtype {q.dtype} (fp16, bf16, fp32 and one dtype for q, r, k, v)"
    if q.dtype == torch.float32 and not INTERPRET and not GPU_FP32:
        return "fp32 on CUDA: chunked's cuBLAS fp32 GEMMs are faster than IEEE fp32 Triton dots (PARALLAX_TRITON_FP32=1 forces)"
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if tuple(r.shape) != tuple(q.shape) or k.shape[0] != b or v.shape[0] != b or k.shape[-1] != d:
        return "shapes do not match"
    if hkv == 0 or hq % hkv != 0 or v.shape[1] != hkv or v.shape[2] != lk:
        return "kv heads do not divide query heads"
    if min(b, hq, lq, lk, d, dv) == 0:
        return "empty tensor"
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        return f"head_dim {d} / value dim {dv} > {MAX_HEAD_DIM}"
    if max(lq, lk) >= 2**31 - 2**20:
        return "sequence too long for int32 indices"
    if window_size is not None and window_size < 1:
        return "window_size must be >= 1"
    if attn_mask is not None:
        if mask_needs_grad or attn_mask.requires_grad:
            return "mask gradient (learned additive mask)"
        if attn_mask.device != q.device:
            return "mask on another device"
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            return f"mask dtype {attn_mask.dtype}"
        if _key_padding_mask(attn_mask, b, hq, lq, lk) is None:
            return f"mask shape {tuple(attn_mask.shape)} is not a key-padding mask [B|1, Hq|1, 1, Lk]"
    elif mask_needs_grad:
        return "mask gradient without a mask"
    return None


def supports(
    q: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
    mask_needs_grad: bool = False,
) -> bool:
    """True when :func:`parallax_fwd` / :func:`parallax_bwd` cover these arguments; otherwise use
    ``chunked`` (see :func:`unsupported_reason`)."""
    return unsupported_reason(q, r, k, v, attn_mask, scale, causal, window_size, mask_needs_grad) is None


def _empty(*shape, dtype, device) -> Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan"))
    return out


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _last_contig(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, seq) strides: ``[B, H, L, D]``, or ``[T, H, D]`` packed (batch stride 0)."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _mask_args(attn_mask, b, hq, lq, lk, device):
    """(tensor, kind, strides) for the kernels: kind 0 none, 1 bool (uint8 view), 2 additive."""
    if attn_mask is None:
        return torch.empty(1, dtype=torch.float32, device=device), 0, (0, 0, 0)
    m = _key_padding_mask(attn_mask, b, hq, lq, lk)
    if m is None:
        raise ValueError(f"parallax triton kernels: unsupported mask shape {tuple(attn_mask.shape)}")
    if m.dtype == torch.bool:
        m, kind = m.view(torch.uint8), 1
    else:
        if m.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            m = m.to(torch.float32)
        kind = 2
    return m, kind, (m.stride(0), m.stride(1), m.stride(3))


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _fwd(q, r, k, v, attn_mask, scale, causal, window_size, varlen=None, variant=None):
    """Shared forward launcher. ``varlen = (cu_seqlens_q, cu_seqlens_k, max_q, max_k, batch)`` for
    packed ``[T, H, D]`` inputs (stats ``[Hq, T]``), else ``[B, H, L, D]`` inputs. ``variant``: see
    :func:`resolve_variant`."""
    q, r, k, v = (_last_contig(t) for t in (q, r, k, v))
    d, dv = q.shape[-1], v.shape[-1]
    var = resolve_variant(variant, "fwd", d, dv, varlen[2] if varlen is not None else q.shape[2])
    if varlen is None:
        b, hq, lq, _ = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        out = _empty(b, hq, lq, dv, dtype=q.dtype, device=q.device)
        stats_shape = (b, hq, lq)
        cu_q = cu_k = torch.empty(1, dtype=torch.int32, device=q.device)
    else:
        cu_q, cu_k, lq, lk, b = varlen
        hq, hkv = q.shape[1], k.shape[1]
        out = _empty(q.shape[0], hq, dv, dtype=q.dtype, device=q.device)
        stats_shape = (hq, q.shape[0])
    mu = _empty(*out.shape, dtype=q.dtype, device=q.device)
    lse = _empty(*stats_shape, dtype=torch.float32, device=q.device)
    c = _empty(*stats_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, mu, lse, c
    vl = varlen is not None
    s_stats = (0, lse.stride(0), lse.stride(1)) if vl else (lse.stride(0), lse.stride(1), lse.stride(2))
    mask, mask_kind, s_mask = _mask_args(attn_mask, b, hq, lq, lk, q.device)
    block_dv = 128 if var.split_dv and dv > 128 else _block(dv)
    nsplit = triton.cdiv(dv, block_dv)
    nv = hq * nsplit
    if var.sched == 2:
        progs = _num_sms(q.device) * var.persist
        grid = lambda meta: (min(triton.cdiv(lq, meta["BLOCK_M"]) * nv * b, progs),)
    elif var.sched == 1:
        grid = lambda meta: (nv * b, triton.cdiv(lq, meta["BLOCK_M"]))
    else:
        grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), nv, b)
    parallax_fwd_kernel[grid](
        q, r, k, v, mask, out, mu, lse, c, cu_q, cu_k,
        *_strides3(q, vl), *_strides3(r, vl), *_strides3(k, vl), *_strides3(v, vl), *_strides3(out, vl),
        *s_stats, *s_mask,
        hq // hkv, lq, lk, triton.next_power_of_2(lq), triton.next_power_of_2(lk),
        scale * LOG2E, window_size if window_size is not None else 0, hq, b,
        D=d, DV=dv, BLOCK_D=_block(d), BLOCK_DV=block_dv,
        CAUSAL=bool(causal), HAS_WINDOW=window_size is not None, MASK_KIND=mask_kind,
        IS_VARLEN=vl, PREC=_prec(q.dtype), UPCAST=_upcast(q.dtype), PRESCALE=mask_kind == 2 or scale <= 0,
        LAZY_RESCALE=LAZY_RESCALE, TMA=var.tma and _tma_ready(k, v), SCHED=var.sched, WS=var.ws,
        NSPLIT=nsplit, TILES=1 if var.tiles == "wide" else 0,
    )
    return out, mu, lse, c


def _bwd(grad_out, q, r, k, v, out, mu_v, lse, c, attn_mask, scale, causal, window_size, varlen=None,
         variant=None):
    """Shared backward launcher (see :func:`_fwd` for ``varlen`` and ``variant``)."""
    q, r, k, v = (_last_contig(t) for t in (q, r, k, v))
    var = resolve_variant(variant, "bwd", q.shape[-1], v.shape[-1], varlen[2] if varlen is not None else q.shape[2])
    # dO, out and mu_v share one set of strides in the kernels
    do = grad_out.contiguous()
    out, mu_v = out.contiguous(), mu_v.contiguous()
    if do.stride() != out.stride() or mu_v.stride() != out.stride():
        do, out, mu_v = (t.clone(memory_format=torch.contiguous_format) for t in (do, out, mu_v))
    lse, c = lse.contiguous(), c.contiguous()
    d, dv = q.shape[-1], v.shape[-1]
    vl = varlen is not None
    if vl:
        cu_q, cu_k, lq, lk, b = varlen
        hq, hkv = q.shape[1], k.shape[1]
        s_stats = (0, lse.stride(0), lse.stride(1))
    else:
        b, hq, lq, _ = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        cu_q = cu_k = torch.empty(1, dtype=torch.int32, device=q.device)
        s_stats = (lse.stride(0), lse.stride(1), lse.stride(2))
    dk = _empty(*k.shape, dtype=k.dtype, device=k.device)
    dv_ = _empty(*v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(q), dk.zero_(), dv_.zero_()
    dc = _empty(*lse.shape, dtype=torch.float32, device=q.device)
    drow = _empty(*lse.shape, dtype=torch.float32, device=q.device)
    mask, mask_kind, s_mask = _mask_args(attn_mask, b, hq, lq, lk, q.device)
    bm_pre = 16 if INTERPRET else 64
    parallax_bwd_preprocess[(triton.cdiv(lq, bm_pre), hq, b)](
        do, out, mu_v, c, dc, drow, *_strides3(out, vl), *s_stats, cu_q, lq,
        DV=dv, BLOCK_DV=_block(dv), IS_VARLEN=vl, BLOCK_M=bm_pre,
    )
    common = {
        "D": d, "DV": dv, "BLOCK_D": _block(d), "BLOCK_DV": _block(dv),
        "CAUSAL": bool(causal), "HAS_WINDOW": window_size is not None, "MASK_KIND": mask_kind,
        "IS_VARLEN": vl, "PREC": _prec(q.dtype), "UPCAST": _upcast(q.dtype),
        "TILES": 1 if var.tiles == "wide" else 0,
    }
    scalars = (hq // hkv, lq, lk, triton.next_power_of_2(lq), triton.next_power_of_2(lk),
               scale * LOG2E, scale, window_size if window_size is not None else 0)
    in_strides = (*_strides3(q, vl), *_strides3(r, vl), *_strides3(k, vl), *_strides3(v, vl),
                  *_strides3(out, vl), *s_stats, *s_mask)
    if var.atomic_dq:  # fp32 sums of dQ (scaled) and dR, added to by the dK/dV kernel
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dr_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq_acc = dr_acc = dc  # unused (ATOMIC_DQ off): any fp32 tensor
    s_acc = _strides3(dq_acc, vl) if var.atomic_dq else (0, 0, 0)
    parallax_bwd_kernel_dkv[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), hkv, b)](
        q, r, k, v, mask, do, lse, c, dc, drow, dk, dv_, dq_acc, dr_acc, cu_q, cu_k,
        *in_strides, *_strides3(dk, vl), *_strides3(dv_, vl), *s_acc, *scalars, ATOMIC_DQ=var.atomic_dq, **common,
    )
    if var.atomic_dq:
        return dq_acc.to(q.dtype), dr_acc.to(q.dtype), dk, dv_
    dq = _empty(*q.shape, dtype=q.dtype, device=q.device)
    dr = _empty(*q.shape, dtype=q.dtype, device=q.device)
    parallax_bwd_kernel_dq[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), hq, b)](
        q, r, k, v, mask, do, lse, c, dc, drow, dq, dr, cu_q, cu_k,
        *in_strides, *_strides3(dq, vl), *scalars, **common,
    )
    return dq, dr, dk, dv_


def parallax_fwd(
    q: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    scale: float | None,
    causal: bool,
    window_size: int | None,
    *,
    variant: str | Variant | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward (SPEC section 3), same signature and outputs as ``chunked.parallax_fwd``.

    Args: ``q``, ``r`` ``[B, Hq, Lq, D]``; ``k`` ``[B, Hkv, Lk, D]``; ``v`` ``[B, Hkv, Lk, Dv]``
    (fp16 / bf16 / fp32, one dtype); ``attn_mask`` None or a key-padding mask (bool True = keep,
    or additive) broadcastable to ``[B, Hq, 1, Lk]``; ``scale`` on ``q . k`` (None: ``D**-0.5``).

    Returns ``(out, mu_v, lse, c)``: ``[B, Hq, Lq, Dv]`` twice in the input dtype, ``[B, Hq, Lq]``
    twice in fp32. Check :func:`supports` first. ``variant`` (keyword): a name in ``FWD_VARIANTS``
    or a :class:`Variant`; default ``None`` takes the DISPATCH table's pick for the shape (same
    results up to rounding order either way). Raises ValueError for an unknown name.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _fwd(q, r, k, v, attn_mask, scale, causal, window_size, variant=variant)


def parallax_bwd(
    grad_out: Tensor,
    q: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    mu_v: Tensor,
    lse: Tensor,
    c: Tensor,
    attn_mask: Tensor | None,
    scale: float | None,
    causal: bool,
    window_size: int | None,
    mask_needs_grad: bool,
    *,
    variant: str | Variant | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Backward (SPEC section 4), same signature and outputs as ``chunked.parallax_bwd``:
    ``(dq, dr, dk, dv, None)``. A mask gradient is not computed here (``supports`` is False when
    ``mask_needs_grad``; this raises). ``variant``: a name in ``BWD_VARIANTS`` or a
    :class:`Variant`, default the DISPATCH pick (see :func:`parallax_fwd`)."""
    if mask_needs_grad:
        raise NotImplementedError("parallax triton backward: mask gradient; use chunked.parallax_bwd")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dq, dr, dk, dv = _bwd(grad_out, q, r, k, v, out, mu_v, lse, c, attn_mask, scale, causal, window_size,
                          variant=variant)
    return dq, dr, dk, dv, None


# ---------------------------------------------------------------------------------------------
# Packed variable-length API (FlashAttention's varlen convention)
# ---------------------------------------------------------------------------------------------


class _ParallaxVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, r, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, window_size):
        varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cu_seqlens_q.numel() - 1)
        out, mu, lse, c = _fwd(q, r, k, v, None, scale, causal, window_size, varlen=varlen)
        ctx.save_for_backward(q, r, k, v, out, mu, lse, c, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, causal, window_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, r, k, v, out, mu, lse, c, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, causal, window_size = ctx.args
        varlen = (cu_q, cu_k, max_q, max_k, cu_q.numel() - 1)
        dq, dr, dk, dv = _bwd(grad_out, q, r, k, v, out, mu, lse, c, None, scale, causal, window_size, varlen=varlen)
        return dq, dr, dk, dv, None, None, None, None, None, None, None


def parallax_attention_varlen(
    q: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
) -> Tensor:
    """Parallax attention over packed sequences of different lengths (FlashAttention's varlen API).

    Args:
        q, r: ``[total_q, Hq, D]``, sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
        k, v: ``[total_k, Hkv, D]`` / ``[total_k, Hkv, Dv]`` with ``Hq % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` cumulative lengths, starting at 0.
        max_seqlen_q, max_seqlen_k: the longest sequence (sizes the grid).
        scale: on ``q . k`` (default ``D**-0.5``); ``r . k`` is never scaled.
        causal: per sequence, aligned to the end of its keys (row ``i`` sees ``j <= i + Lk_b - Lq_b``).
        window_size: per sequence sliding window ``W`` (SPEC section 5).

    Returns:
        ``[total_q, Hq, Dv]`` in ``q``'s dtype, differentiable w.r.t. q, r, k, v. A row with no
        allowed key gives 0.
    """
    for name, t in (("q", q), ("r", r), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"parallax_attention_varlen: `{name}` must be [total, H, D], got {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES or t.dtype != q.dtype:
            raise TypeError(f"parallax_attention_varlen: `{name}` dtype {t.dtype}; one of fp16/bf16/fp32 for all")
    if r.shape != q.shape or k.shape[-1] != q.shape[-1] or k.shape[:2] != v.shape[:2]:
        raise ValueError("parallax_attention_varlen: shapes q/r [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv]")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"parallax_attention_varlen: Hq={q.shape[1]} not a multiple of Hkv={k.shape[1]}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"parallax_attention_varlen: head dim > {MAX_HEAD_DIM}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1:
            raise TypeError(f"parallax_attention_varlen: `{name}` must be a 1-D int32 tensor")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("parallax_attention_varlen: cu_seqlens_q and cu_seqlens_k must have B + 1 entries each")
    if window_size is not None and window_size < 1:
        raise ValueError(f"parallax_attention_varlen: window_size must be >= 1, got {window_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _ParallaxVarlenFunction.apply(
        q, r, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), int(max_seqlen_q), int(max_seqlen_k),
        scale, bool(causal), window_size,
    )


def main() -> None:
    """Run one small forward/backward against the float64 oracle and print the errors."""
    from ..reference import parallax_attention_ref

    device = "cpu" if INTERPRET else "cuda"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    b, hq, hkv, l, d = 1, 2, 1, 40, 64
    q = torch.randn(b, hq, l, d, device=device).to(dtype)
    r = (torch.randn(b, hq, l, d, device=device) * d**-0.5).to(dtype)
    k = torch.randn(b, hkv, l, d, device=device).to(dtype)
    v = torch.randn(b, hkv, l, d, device=device).to(dtype)
    out = parallax_fwd(q, r, k, v, None, None, True, None)[0]
    ref = parallax_attention_ref(*(t.double() for t in (q, r, k, v)), causal=True)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"device={device} dtype={dtype} forward relative RMS error vs float64: {err:.2e}")


if __name__ == "__main__":
    main()
