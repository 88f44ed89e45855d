"""Split-KV Triton decode kernel for Parallax attention with a KV cache (SPEC section 3).

Entry point :func:`parallax_decode` (called by
:func:`parallax_compile.decode.parallax_attention_with_kvcache`, which checks the arguments).

Work split: one program per ``(key split, KV head, sequence)``. The program owns the ``G * Lq``
query rows of its GQA group (``G = Hq // Hkv`` heads times ``Lq`` new tokens) and stacks their
``q`` rows and ``r`` rows into one ``[2 * BLOCK_M, D]`` tile, ``[q; r]``. Per key tile:

* ``[S; G] = [q; r] K^T`` -- one tensor-core GEMM gives the logits and the probe scores;
* ``p = exp2(S * scale * log2e - m)``, online max ``m`` from ``S`` only, one rescale ``alpha``;
* ``[O1; O2] = alpha * [O1; O2] + [p; p * G] V`` -- one GEMM for both value accumulators;
* ``d1 = alpha * d1 + rowsum(p)``, ``d2 = alpha * d2 + rowsum(p * G)``.

So the correction branch costs no extra K/V traffic: each K and V tile is read from HBM once for
all ``2 * G * Lq`` rows. ``r`` is never cached. With one split the program writes the output
(epilogue ``o = O1/d1 * (1 + d2/d1) - O2/d1``); with several, each writes its partial
``(m, d1, d2, O1, O2)`` (fp32) and :func:`parallax_decode_merge_kernel` (a second, small launch)
rescales each split by ``exp2(m_split - m_max)``, sums and applies the epilogue: exact.

Cache layouts: contiguous ``[B, Hkv, L_max, D]`` or paged ``[num_blocks, Hkv, block_size, D]`` with a
``block_table [B, max_blocks]`` (any strides: FlashAttention's ``[num_blocks, block_size, Hkv, D]``
transposed to ``[num_blocks, Hkv, block_size, D]`` works without a copy). Keys are gathered per row,
so any ``block_size`` works.

Masking: row ``i`` of sequence ``b`` is at ``p = cache_seqlens[b] - Lq + i`` and sees keys
``j <= p`` and, with a window ``W``, ``j > p - W`` (SPEC section 5, end-aligned causal). Splits
cover ``[lo, L_b)`` of each sequence in chunks of whole key tiles; a split with no key writes
``m = -inf`` and zeros, which the merge ignores. A row with no key gives 0.

Variants (:class:`DecodeVariant`, chosen per call; :func:`pick_variant` when the caller gives none):

* ``mode``: ``"stack"`` (the ``[q; r]`` tile above; at least 8 q rows, padded), ``"unstack"`` (two
  GEMMs per product, ``q K^T`` and ``r K^T``, ``p V`` and ``(p*g) V``, on the same K/V registers; at
  least 16 rows each) or ``"vector"`` (only ``G * Lq == 1``, one query row per program:
  :func:`parallax_decode_vec_kernel`, no tensor cores and no padded rows: ``q . k`` and ``r . k``
  are a broadcast multiply and a sum over ``D``, ``O1 += p V`` and ``O2 += (p*g) V`` sums over
  the key tile; same partials and merge). All three read each K/V tile from HBM once.
* ``tile``: ``(BLOCK_N, num_warps, num_stages)``, or None to autotune over ``_TILES``.
* splits: ``num_splits`` when given (the caller's ``num_splits`` wins over the variant's), else
  :func:`pick_num_splits` with the variant's ``programs_per_sm`` and ``min_split_granules``; one
  split writes the output directly (no merge launch).
* ``merge``: ``"rows"`` (one program per output row over all of ``Dv``, 8 splits per load) or
  ``"wide"`` (one program per row and 32 columns of ``Dv``, up to 64 splits per load: fewer
  dependent loads when there are many splits and few rows).
* ``pdl``: launch the merge with programmatic dependent launch (Hopper and newer; ignored
  elsewhere): the split kernel signals ``griddepcontrol.launch_dependents`` once its key loop is
  done, the merge grid starts then and waits (``griddepcontrol.wait``) for the split kernel's
  completion and memory before it reads the partials: the second launch's latency overlaps the
  first launch's tail.

Dispatch rule (:func:`pick_variant`): a shape's class is ``(rows, d, fill, length)`` with
``rows = "one"`` when ``G * Lq == 1`` (Hq = Hkv decode) else ``"group"``; ``d = 128`` when
``max(D, Dv) <= 128`` else ``256``; ``fill = "wide"`` when ``B * Hkv >=`` the SM count (enough
programs without splitting) else ``"narrow"``; ``length = "long"`` when ``L_max >= 65536`` else
``"short"``. ``_DISPATCH`` maps a class to its variant; a class it does not list gets
``DecodeVariant()`` (stacked tile, autotuned, 4 programs per SM, row merge: the behaviour before
variants existed). The entries are measured with ``benchmarks/sweep_decode.py`` on the H200. At
launch an explicit tile whose K/V stages do not fit ``SMEM_BUDGET`` for the dtype falls back to
autotuning, and ``"vector"`` with ``G * Lq > 1`` falls back to ``"stack"``.

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) bf16 GEMM operands are upcast to fp32 (Triton
3.7's interpreter multiplies bf16 as raw uint16) and the autotuner is bypassed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_parallax import _dot  # the one fp32-accumulating tile GEMM (interpreter bf16 upcast)

__all__ = [
    "DecodeVariant",
    "parallax_decode",
    "parallax_decode_fwd_kernel",
    "parallax_decode_merge_kernel",
    "parallax_decode_vec_kernel",
    "pick_num_splits",
    "pick_variant",
    "shape_class",
    "split_plan",
    "supports",
    "tile_fits",
]

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Fill fresh allocations with NaN, so an element the kernels forget to write cannot pass a test.
POISON = os.environ.get("PARALLAX_TRITON_POISON", "0") not in ("", "0")
MAX_HEAD_DIM = 256
MAX_GROUP_ROWS = 64  # G * Lq rows per program (q rows; the stacked tile holds twice that)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Splits cover whole multiples of this many keys (a multiple of every BLOCK_N below).
SPLIT_GRANULE = 16 if INTERPRET else 128
SMEM_BUDGET = 160 * 1024  # bytes of K/V stages per program (H100/H200: 227 KB per SM, minus the
# kernel's other buffers: at fp32 D=256 a 64x3 pipeline asked for 282 KB on the H200)


# `PARALLAX_TRITON_AUTOTUNE=0`: compile and run only the first configuration that fits (tests, quick runs).
AUTOTUNE = os.environ.get("PARALLAX_TRITON_AUTOTUNE", "1") not in ("", "0")

# (BLOCK_N, warps, stages), in order of preference; at D=128 bf16 the first four compile for sm_90
# without spills (ptxas: 80-170 registers); the last ones fit D=256 and fp32 in shared memory.
_TILES = ((64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2), (64, 4, 2), (64, 4, 1), (32, 4, 2), (32, 4, 1))


MODES = ("stack", "unstack", "vector")
MERGES = ("rows", "wide")


@dataclass(frozen=True)
class DecodeVariant:
    """How :func:`parallax_decode` runs one call (module docstring, "Variants"). The defaults are
    the behaviour before variants existed.

    Attributes:
        mode: ``"stack"``, ``"unstack"`` or ``"vector"`` (``G * Lq == 1`` only).
        tile: ``(BLOCK_N, num_warps, num_stages)``, or None to autotune over ``_TILES``.
        programs_per_sm: split target of :func:`pick_num_splits` (programs per SM, > 0).
        min_split_granules: shortest split of :func:`pick_num_splits`, in ``SPLIT_GRANULE`` keys.
        num_splits: splits per (sequence, KV head); None: :func:`pick_num_splits`.
        merge: ``"rows"`` or ``"wide"`` (the merge launch's work split).
        pdl: overlap the merge launch with the split kernel's tail (programmatic dependent launch).

    Raises:
        ValueError: an unknown ``mode`` / ``merge``, a malformed ``tile``, a non-positive count.
    """

    mode: str = "stack"
    tile: tuple[int, int, int] | None = None
    programs_per_sm: float = 4
    min_split_granules: int = 2
    num_splits: int | None = None
    merge: str = "rows"
    pdl: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"DecodeVariant: `mode` must be one of {MODES}, got {self.mode!r}")
        if self.merge not in MERGES:
            raise ValueError(f"DecodeVariant: `merge` must be one of {MERGES}, got {self.merge!r}")
        t = self.tile
        if t is not None and (len(t) != 3 or min(t) < 1 or t[0] & (t[0] - 1) or t[1] & (t[1] - 1)):
            raise ValueError(f"DecodeVariant: `tile` must be (BLOCK_N, num_warps, num_stages) with BLOCK_N "
                             f"and num_warps powers of 2, or None, got {t!r}")
        n = self.num_splits
        if not self.programs_per_sm > 0 or self.min_split_granules < 1 or (n is not None and n < 1):
            raise ValueError("DecodeVariant: programs_per_sm, min_split_granules and num_splits must be positive, "
                             f"got {self.programs_per_sm}, {self.min_split_granules}, {self.num_splits}")


def shape_class(b: int, hq: int, hkv: int, lq: int, d: int, dv: int, l_max: int, sm_count: int) -> tuple:
    """The dispatch class ``(rows, d, fill, length)`` of a decode shape (module docstring)."""
    rows = "one" if (hq // hkv) * lq == 1 else "group"
    return (rows, 128 if max(d, dv) <= 128 else 256, "wide" if b * hkv >= sm_count else "narrow",
            "long" if l_max >= 65536 else "short")


# Shape class -> variant. Placeholders: every entry is today's choice (DecodeVariant()) until the
# H200 sweep (benchmarks/sweep_decode.py) fills it in; a class not listed gets DecodeVariant().
# Shapes the sweep measures, per class: B32 H8:8 L16k D128 ("one", 128, "wide", "short");
# B32 and B8 Hq32:8 L16k, B1 Hq32:8 L32k D128 ("group", 128, "wide"/"narrow", "short");
# B1 H8 L16k D128 ("one", 128, "narrow", "short"); B1 H8 L128k D128 ("one", 128, "narrow", "long");
# B8 Hq4:1 L32k D256 ("group", 256, "narrow", "short"); B8 H8:8 L16k D256 ("one", 256, "narrow", "short").
_DISPATCH: dict[tuple, DecodeVariant] = {
    ("one", 128, "wide", "short"): DecodeVariant(),
    ("one", 128, "narrow", "short"): DecodeVariant(),
    ("one", 128, "narrow", "long"): DecodeVariant(),
    ("group", 128, "wide", "short"): DecodeVariant(),
    ("group", 128, "narrow", "short"): DecodeVariant(),
    ("one", 256, "narrow", "short"): DecodeVariant(),
    ("group", 256, "narrow", "short"): DecodeVariant(),
}


def pick_variant(b: int, hq: int, hkv: int, lq: int, d: int, dv: int, l_max: int,
                 sm_count: int) -> DecodeVariant:
    """The variant :func:`parallax_decode` uses when the caller gives none: ``_DISPATCH`` of the
    shape's :func:`shape_class`, else ``DecodeVariant()``."""
    return _DISPATCH.get(shape_class(b, hq, hkv, lq, d, dv, l_max, sm_count), DecodeVariant())


def tile_fits(tile: tuple[int, int, int], d: int, dv: int, item: int) -> bool:
    """Whether ``num_stages`` K/V tiles of ``BLOCK_N`` keys (``item``-byte elements) fit ``SMEM_BUDGET``."""
    return tile[2] * tile[0] * (_block(d) + _block(dv)) * item <= SMEM_BUDGET


def _configs(vec: bool = False) -> list[triton.Config]:
    """``_TILES`` as autotune configurations (``vec``: the vector kernel takes the stages as ``STAGES`` too)."""
    tiles = ((16, 4, 1),) if INTERPRET else _TILES
    return [triton.Config({"BLOCK_N": bn} | ({"STAGES": s} if vec else {}), num_warps=w, num_stages=s)
            for bn, w, s in tiles]


def _prune(configs, named_args, **kwargs):
    """Keep the configurations whose K/V pipeline stages fit in shared memory (the smallest one when
    none does); only the first of them with ``PARALLAX_TRITON_AUTOTUNE=0``."""
    d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    dv = kwargs.get("BLOCK_DV", named_args.get("BLOCK_DV", 128))
    item = named_args["k"].element_size() if hasattr(named_args.get("k"), "element_size") else 2

    def tile(c):
        return c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    keep = [c for c in configs if tile_fits(tile(c), d, dv, item)] or \
        [min(configs, key=lambda c: c.num_stages * c.kwargs["BLOCK_N"])]
    return keep if AUTOTUNE else keep[:1]


@triton.jit
def _stack(a, b, BM: tl.constexpr, X: tl.constexpr):
    """``[BM, X]`` twice -> ``[2 * BM, X]`` (``a`` on top)."""
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * BM, X))


@triton.jit
def _stack1(a, b, BM: tl.constexpr):
    """``[BM]`` twice -> ``[2 * BM]``."""
    return tl.reshape(tl.permute(tl.join(a, b), (1, 0)), (2 * BM,))


@triton.jit
def _unstack(x, BM: tl.constexpr, X: tl.constexpr):
    """``[2 * BM, X]`` -> top ``[BM, X]``, bottom ``[BM, X]``."""
    return tl.split(tl.permute(tl.reshape(x, (2, BM, X)), (1, 2, 0)))


@triton.jit
def _load_kv(p_kh, p_vh, block_table, i_b64, o_n, m_n, o_d, o_dv, stride_bt, page_size,
             stride_kb, stride_kl, stride_vb, stride_vl,
             D: tl.constexpr, DV: tl.constexpr, PAGED: tl.constexpr):
    """Key tile ``[BN, BD]`` and value tile ``[BN, BDV]`` of the keys ``o_n`` of sequence ``i_b64``
    (contiguous or paged); keys outside ``m_n`` and padded columns read as 0."""
    if PAGED:
        b_page = tl.load(block_table + i_b64 * stride_bt + o_n // page_size, mask=m_n, other=0).to(tl.int64)
        o_row = (o_n % page_size).to(tl.int64)
        p_k = p_kh + b_page[:, None] * stride_kb + o_row[:, None] * stride_kl + o_d[None, :]
        p_v = p_vh + b_page[:, None] * stride_vb + o_row[:, None] * stride_vl + o_dv[None, :]
    else:
        o_n64 = o_n.to(tl.int64)
        p_k = p_kh + i_b64 * stride_kb + o_n64[:, None] * stride_kl + o_d[None, :]
        p_v = p_vh + i_b64 * stride_vb + o_n64[:, None] * stride_vl + o_dv[None, :]
    b_k = tl.load(p_k, mask=m_n[:, None] & (o_d < D)[None, :], other=0.0)  # [BN, BD]
    b_v = tl.load(p_v, mask=m_n[:, None] & (o_dv < DV)[None, :], other=0.0)  # [BN, BDV]
    return b_k, b_v


# Per-call scalars whose value would otherwise pick a specialisation (== 1, divisible by 16): one
# compiled kernel serves every split count and window.
_NO_SPECIALIZE = ["chunk", "num_splits", "WINDOW", "TILES"]


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _decode_fwd(
    q, r, k, v, block_table, cache_seqlens, o, part_m, part_d1, part_d2, part_o1, part_o2,
    stride_qb, stride_qh, stride_ql,
    stride_rb, stride_rh, stride_rl,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_bt, page_size, chunk, num_splits, qk_scale, WINDOW, TILES,
    G: tl.constexpr, LQ: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PAGED: tl.constexpr, SPLIT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, STACK: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(num_splits, Hkv, B)``. Writes ``o`` (one split) or the partials (several)."""
    i_s, i_hk, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64, i_hk64 = i_b.to(tl.int64), i_hk.to(tl.int64)
    seq_len = tl.load(cache_seqlens + i_b)

    # rows of the group: t = hg * LQ + i (query head i_hk * G + hg, new token i)
    o_t = tl.arange(0, BLOCK_M)
    m_t = o_t < G * LQ
    o_hg = o_t // LQ
    o_i = o_t % LQ
    o_h64 = (i_hk * G + o_hg).to(tl.int64)
    b_pos = seq_len - LQ + o_i  # [BM] position of each row in its sequence
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_qd = m_t[:, None] & (o_d < D)[None, :]
    p_q = q + i_b64 * stride_qb + o_h64[:, None] * stride_qh + o_i[:, None] * stride_ql + o_d[None, :]
    p_r = r + i_b64 * stride_rb + o_h64[:, None] * stride_rh + o_i[:, None] * stride_rl + o_d[None, :]
    b_q = tl.load(p_q, mask=m_qd, other=0.0)  # [BM, BD]
    b_r = tl.load(p_r, mask=m_qd, other=0.0)  # [BM, BD]
    if STACK:
        b_qr = _stack(b_q, b_r, BLOCK_M, BLOCK_D)  # [2BM, BD]: [q; r]

    # keys this split visits: [lo, hi) of the sequence, cut to [i_s * chunk, (i_s + 1) * chunk)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - LQ - WINDOW + 1, 0)
    s_lo = i_s * chunk
    hi = tl.minimum(seq_len, s_lo + chunk)
    start = tl.maximum(s_lo, (lo // BLOCK_N) * BLOCK_N)

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_d1 = tl.zeros([BLOCK_M], tl.float32)
    b_d2 = tl.zeros([BLOCK_M], tl.float32)
    b_o = tl.zeros([2 * BLOCK_M, BLOCK_DV], tl.float32)  # [O1; O2] (STACK)
    b_o1 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # O1, O2 (not STACK)
    b_o2 = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    p_kh = k + i_hk64 * stride_kh
    p_vh = v + i_hk64 * stride_vh
    for start_n in range(start, hi, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        b_k, b_v = _load_kv(p_kh, p_vh, block_table, i_b64, o_n, m_n, o_d, o_dv, stride_bt, page_size,
                            stride_kb, stride_kl, stride_vb, stride_vl, D, DV, PAGED)
        if STACK:
            b_x = _dot(b_qr, tl.trans(b_k), None, PREC, UPCAST)  # [2BM, BN]: [q K^T; r K^T]
            b_s, b_g = _unstack(b_x, BLOCK_M, BLOCK_N)  # logits (raw), probe scores (never scaled)
        else:
            b_s = _dot(b_q, tl.trans(b_k), None, PREC, UPCAST)  # [BM, BN]
            b_g = _dot(b_r, tl.trans(b_k), None, PREC, UPCAST)  # [BM, BN]
        keep = m_t[:, None] & m_n[None, :] & (o_n[None, :] <= b_pos[:, None])
        if HAS_WINDOW:
            keep = keep & (o_n[None, :] > b_pos[:, None] - WINDOW)
        b_s = tl.where(keep, b_s * qk_scale, float("-inf"))  # base-2 logits
        b_mnew = tl.maximum(b_m, tl.max(b_s, 1))
        b_mref = tl.where(b_mnew == float("-inf"), 0.0, b_mnew)
        b_p = tl.exp2(b_s - b_mref[:, None])  # [BM, BN]
        b_alpha = tl.exp2(b_m - b_mref)  # [BM]
        b_pg = b_p * b_g
        b_d1 = b_d1 * b_alpha + tl.sum(b_p, 1)
        b_d2 = b_d2 * b_alpha + tl.sum(b_pg, 1)
        if STACK:
            b_pp = _stack(b_p, b_pg, BLOCK_M, BLOCK_N).to(b_v.dtype)  # [2BM, BN]: [p; p*g]
            b_a2 = _stack1(b_alpha, b_alpha, BLOCK_M)
            b_o = _dot(b_pp, b_v, b_o * b_a2[:, None], PREC, UPCAST)  # [2BM, BDV]
        else:
            b_o1 = _dot(b_p.to(b_v.dtype), b_v, b_o1 * b_alpha[:, None], PREC, UPCAST)
            b_o2 = _dot(b_pg.to(b_v.dtype), b_v, b_o2 * b_alpha[:, None], PREC, UPCAST)
        b_m = b_mnew

    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the merge grid may start; it waits for our stores
    if STACK:
        b_o1, b_o2 = _unstack(b_o, BLOCK_M, BLOCK_DV)  # [BM, BDV] each
    if SPLIT:
        o_row = (i_b64 * tl.num_programs(1) + i_hk64) * (G * LQ) + o_t  # row of [B, Hq, Lq] (flat)
        o_p = o_row * num_splits + i_s
        tl.store(part_m + o_p, b_m, mask=m_t)
        tl.store(part_d1 + o_p, b_d1, mask=m_t)
        tl.store(part_d2 + o_p, b_d2, mask=m_t)
        m_o = m_t[:, None] & (o_dv < DV)[None, :]
        tl.store(part_o1 + o_p[:, None] * DV + o_dv[None, :], b_o1, mask=m_o)
        tl.store(part_o2 + o_p[:, None] * DV + o_dv[None, :], b_o2, mask=m_o)
    else:
        b_empty = b_m == float("-inf")
        b_inv = tl.where(b_empty, 0.0, 1.0 / tl.where(b_empty, 1.0, b_d1))
        b_mu = b_o1 * b_inv[:, None]
        b_out = b_mu * (1.0 + b_d2 * b_inv)[:, None] - b_o2 * b_inv[:, None]
        p_o = o + i_b64 * stride_ob + o_h64[:, None] * stride_oh + o_i[:, None] * stride_ol + o_dv[None, :]
        tl.store(p_o, b_out.to(o.dtype.element_ty), mask=m_t[:, None] & (o_dv < DV)[None, :])


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _decode_vec(
    q, r, k, v, block_table, cache_seqlens, o, part_m, part_d1, part_d2, part_o1, part_o2,
    stride_qb, stride_qh, stride_ql,
    stride_rb, stride_rh, stride_rl,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_bt, page_size, chunk, num_splits, qk_scale, WINDOW, TILES,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PAGED: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
    BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    """``G * Lq == 1`` (query head ``i_h`` reads KV head ``i_h``, one new token): grid
    ``(num_splits, H, B)``, no tensor cores. Per key tile ``s = (K q) * scale``, ``g = K r`` (sums
    over ``D``), ``O1 += p V``, ``O2 += (p*g) V`` (sums over the tile); same statistics, partials
    and epilogue as :func:`parallax_decode_fwd_kernel`."""
    i_s, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b64, i_h64 = i_b.to(tl.int64), i_h.to(tl.int64)
    seq_len = tl.load(cache_seqlens + i_b)
    b_pos = seq_len - 1  # position of the query token
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_d = o_d < D
    m_dv = o_dv < DV
    b_q = tl.load(q + i_b64 * stride_qb + i_h64 * stride_qh + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_q = b_q * qk_scale  # [BD]: logits come out in base-2 units
    b_r = tl.load(r + i_b64 * stride_rb + i_h64 * stride_rh + o_d, mask=m_d, other=0.0).to(tl.float32)

    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - 1 - WINDOW + 1, 0)
    s_lo = i_s * chunk
    hi = tl.minimum(seq_len, s_lo + chunk)
    start = tl.maximum(s_lo, (lo // BLOCK_N) * BLOCK_N)

    b_m = tl.full([], float("-inf"), tl.float32)
    b_d1 = tl.full([], 0.0, tl.float32)
    b_d2 = tl.full([], 0.0, tl.float32)
    b_o1 = tl.zeros([BLOCK_DV], tl.float32)
    b_o2 = tl.zeros([BLOCK_DV], tl.float32)
    p_kh = k + i_h64 * stride_kh
    p_vh = v + i_h64 * stride_vh
    # explicit stages: Triton software-pipelines (cp.async) only the loads that feed a tl.dot unless
    # the loop asks for it
    for start_n in tl.range(start, hi, BLOCK_N, num_stages=STAGES):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        b_k, b_v = _load_kv(p_kh, p_vh, block_table, i_b64, o_n, m_n, o_d, o_dv, stride_bt, page_size,
                            stride_kb, stride_kl, stride_vb, stride_vl, D, DV, PAGED)
        b_k = b_k.to(tl.float32)
        b_s = tl.sum(b_k * b_q[None, :], 1)  # [BN] base-2 logits
        b_g = tl.sum(b_k * b_r[None, :], 1)  # [BN] probe scores (never scaled)
        keep = m_n & (o_n <= b_pos)
        if HAS_WINDOW:
            keep = keep & (o_n > b_pos - WINDOW)
        b_s = tl.where(keep, b_s, float("-inf"))
        b_mnew = tl.maximum(b_m, tl.max(b_s, 0))
        b_mref = tl.where(b_mnew == float("-inf"), 0.0, b_mnew)
        b_p = tl.exp2(b_s - b_mref)  # [BN]
        b_alpha = tl.exp2(b_m - b_mref)
        b_pg = b_p * b_g
        b_d1 = b_d1 * b_alpha + tl.sum(b_p, 0)
        b_d2 = b_d2 * b_alpha + tl.sum(b_pg, 0)
        b_vf = b_v.to(tl.float32)
        b_o1 = b_o1 * b_alpha + tl.sum(b_p[:, None] * b_vf, 0)  # [BDV]
        b_o2 = b_o2 * b_alpha + tl.sum(b_pg[:, None] * b_vf, 0)
        b_m = b_mnew

    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if SPLIT:
        o_p = (i_b64 * tl.num_programs(1) + i_h64) * num_splits + i_s  # (row of [B, H], split)
        tl.store(part_m + o_p, b_m)
        tl.store(part_d1 + o_p, b_d1)
        tl.store(part_d2 + o_p, b_d2)
        tl.store(part_o1 + o_p * DV + o_dv, b_o1, mask=m_dv)
        tl.store(part_o2 + o_p * DV + o_dv, b_o2, mask=m_dv)
    else:
        b_empty = b_m == float("-inf")
        b_inv = tl.where(b_empty, 0.0, 1.0 / tl.where(b_empty, 1.0, b_d1))
        b_out = b_o1 * b_inv * (1.0 + b_d2 * b_inv) - b_o2 * b_inv
        tl.store(o + i_b64 * stride_ob + i_h64 * stride_oh + o_dv, b_out.to(o.dtype.element_ty), mask=m_dv)


parallax_decode_fwd_kernel = triton.autotune(
    configs=_configs(), key=["D", "DV", "G", "LQ", "PAGED", "SPLIT", "STACK", "TILES"],
    prune_configs_by={"early_config_prune": _prune})(_decode_fwd)
parallax_decode_vec_kernel = triton.autotune(
    configs=_configs(vec=True), key=["D", "DV", "PAGED", "SPLIT", "TILES"],
    prune_configs_by={"early_config_prune": _prune})(_decode_vec)


@triton.jit(do_not_specialize=["num_splits", "HQ", "LQ"])
def parallax_decode_merge_kernel(
    part_m, part_d1, part_d2, part_o1, part_o2, o,
    stride_ob, stride_oh, stride_ol, num_splits, HQ, LQ,
    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK_S: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(B * Hq * Lq, cdiv(Dv, BLOCK_DV))``: merge the splits of one row (columns
    ``[i * BLOCK_DV, (i + 1) * BLOCK_DV)`` of ``Dv``) exactly (SPEC section 3): global max over the
    splits, then ``CHUNK_S`` splits at a time rescaled by ``exp2(m_split - m_max)`` and summed.
    ``PDL``: launched as a programmatic dependent of the split kernel: wait for its results first."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    i_row = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, BLOCK_S)
    b_mmax = tl.max(tl.load(part_m + i_row * num_splits + o_s, mask=o_s < num_splits, other=float("-inf")), 0)
    b_mref = tl.where(b_mmax == float("-inf"), 0.0, b_mmax)
    o_c = tl.arange(0, CHUNK_S)
    o_dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    b_d1 = tl.zeros([CHUNK_S], tl.float32)
    b_d2 = tl.zeros([CHUNK_S], tl.float32)
    b_o1 = tl.zeros([BLOCK_DV], tl.float32)
    b_o2 = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, num_splits, CHUNK_S):
        m_c = (s0 + o_c) < num_splits
        o_p = i_row * num_splits + s0 + o_c
        b_w = tl.exp2(tl.load(part_m + o_p, mask=m_c, other=float("-inf")) - b_mref)  # empty splits weigh 0
        b_d1 += b_w * tl.load(part_d1 + o_p, mask=m_c, other=0.0)
        b_d2 += b_w * tl.load(part_d2 + o_p, mask=m_c, other=0.0)
        m_o = m_c[:, None] & (o_dv < DV)[None, :]
        b_o1 += tl.sum(b_w[:, None] * tl.load(part_o1 + o_p[:, None] * DV + o_dv[None, :], mask=m_o, other=0.0), 0)
        b_o2 += tl.sum(b_w[:, None] * tl.load(part_o2 + o_p[:, None] * DV + o_dv[None, :], mask=m_o, other=0.0), 0)
    d1 = tl.sum(b_d1, 0)
    d2 = tl.sum(b_d2, 0)
    b_empty = b_mmax == float("-inf")
    b_inv = tl.where(b_empty, 0.0, 1.0 / tl.where(b_empty, 1.0, d1))
    b_out = b_o1 * b_inv * (1.0 + d2 * b_inv) - b_o2 * b_inv
    i_i = i_row % LQ
    i_h = (i_row // LQ) % HQ
    i_b = i_row // (LQ * HQ)
    p_o = o + i_b * stride_ob + i_h * stride_oh + i_i * stride_ol + o_dv
    tl.store(p_o, b_out.to(o.dtype.element_ty), mask=o_dv < DV)


def supports(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether :func:`parallax_decode` covers these inputs (else use the portable path)."""
    dev_ok = q.is_cuda or (INTERPRET and q.device.type == "cpu")
    g_rows = (q.shape[1] // max(1, k_cache.shape[1])) * q.shape[2]
    return (dev_ok and q.dtype in _DTYPES and q.shape[-1] <= MAX_HEAD_DIM and v_cache.shape[-1] <= MAX_HEAD_DIM
            and g_rows <= MAX_GROUP_ROWS)


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def pick_num_splits(batch: int, hkv: int, l_max: int, sm_count: int, programs_per_sm: float = 4,
                    min_split_granules: int = 2) -> int:
    """Splits per (sequence, KV head): enough programs for about ``programs_per_sm`` per SM, each
    split at least ``min_split_granules`` granules (``SPLIT_GRANULE`` keys each) long, at most 256."""
    granules = triton.cdiv(max(l_max, 1), SPLIT_GRANULE)
    want = triton.cdiv(math.ceil(programs_per_sm * sm_count), max(1, batch * hkv))
    return max(1, min(want, triton.cdiv(granules, min_split_granules), 256))


def split_plan(b: int, hkv: int, l_max: int, sm_count: int, variant: DecodeVariant,
               num_splits: int | None = None) -> tuple[int, int]:
    """``(splits, chunk)``: the number of key splits per (sequence, KV head) a launch uses and the
    keys per split (a multiple of ``SPLIT_GRANULE``; no split starts past ``L_max``)."""
    splits = num_splits or variant.num_splits or pick_num_splits(
        b, hkv, l_max, sm_count, variant.programs_per_sm, variant.min_split_granules)
    chunk = triton.cdiv(triton.cdiv(max(l_max, 1), splits), SPLIT_GRANULE) * SPLIT_GRANULE
    return max(1, triton.cdiv(max(l_max, 1), chunk)), chunk


def _has_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled CUDA on compute capability >= 9 (never the interpreter)."""
    return device.type == "cuda" and not INTERPRET and torch.cuda.get_device_capability(device)[0] >= 9


def _empty(*shape, dtype, device) -> Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan"))
    return out


def parallax_decode(q: Tensor, r: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                    block_table: Tensor | None, scale: float, window_size: int | None,
                    num_splits: int | None = None, variant: DecodeVariant | None = None) -> Tensor:
    """Launch the decode kernel (and the merge when split). Arguments as
    :func:`parallax_compile.decode.parallax_attention_with_kvcache` (already checked), ``scale``
    resolved to a float; ``variant`` picks the implementation (None: :func:`pick_variant`), and
    ``num_splits``, when given, overrides the variant's. Returns ``[B, Hq, Lq, Dv]`` in ``q``'s dtype."""
    b, hq, lq, d = q.shape
    hkv, dv = k_cache.shape[1], v_cache.shape[-1]
    g = hq // hkv
    paged = block_table is not None
    l_max = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    q, r = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, r))
    k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_cache, v_cache))
    out = _empty(b, hq, lq, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    sm_count = _sm_count(q.device)
    var = variant or pick_variant(b, hq, hkv, lq, d, dv, l_max, sm_count)
    splits, chunk = split_plan(b, hkv, l_max, sm_count, var, num_splits)
    vector = var.mode == "vector" and g * lq == 1
    tile = var.tile if var.tile is not None and tile_fits(var.tile, d, dv, k_cache.element_size()) else None
    split = splits > 1
    pdl = var.pdl and split and _has_pdl(q.device)
    if split:
        rows = b * hq * lq
        part_m = _empty(rows * splits, dtype=torch.float32, device=q.device)
        part_d1, part_d2 = _empty(rows * splits, dtype=torch.float32, device=q.device), \
            _empty(rows * splits, dtype=torch.float32, device=q.device)
        part_o1 = _empty(rows * splits * dv, dtype=torch.float32, device=q.device)
        part_o2 = _empty(rows * splits * dv, dtype=torch.float32, device=q.device)
    else:
        part_m = part_d1 = part_d2 = part_o1 = part_o2 = out
    bt = block_table if paged else cache_seqlens
    args = (
        q, r, k_cache, v_cache, bt, cache_seqlens, out, part_m, part_d1, part_d2, part_o1, part_o2,
        q.stride(0), q.stride(1), q.stride(2),
        r.stride(0), r.stride(1), r.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        bt.stride(0) if paged else 0, k_cache.shape[2] if paged else 1, chunk, splits,
        scale * LOG2E, window_size if window_size is not None else 0,
        1 if chunk // SPLIT_GRANULE < 8 else 8,  # autotune bucket: short or long splits
    )
    consts = {"D": d, "DV": dv, "BLOCK_D": _block(d), "BLOCK_DV": _block(dv),
              "HAS_WINDOW": window_size is not None,
                  "PAGED": paged, "SPLIT": split, "PDL": pdl}
    if vector:
        kernel = _decode_vec if tile is not None else parallax_decode_vec_kernel
    else:
        stack = var.mode != "unstack"  # "vector" on a group (G * Lq > 1) falls back to stack
        kernel = _decode_fwd if tile is not None else parallax_decode_fwd_kernel
        consts |= {"G": g, "LQ": lq, "BLOCK_M": max(8 if stack else 16, triton.next_power_of_2(g * lq)),
                       "PREC": "ieee" if q.dtype == torch.float32 else "tf32",
                       "UPCAST": INTERPRET and q.dtype == torch.bfloat16, "STACK": stack}
    if tile is not None:
        consts |= {"BLOCK_N": tile[0], "num_warps": tile[1], "num_stages": tile[2]}
        if vector:
            consts["STAGES"] = tile[2]
    kernel[(splits, hkv, b)](*args, **consts)
    if split:
        block_s = max(2, triton.next_power_of_2(splits))
        if var.merge == "wide":
            merge_dv, chunk_s = min(32, _block(dv)), min(64, block_s)
        else:
            merge_dv, chunk_s = _block(dv), 8
        parallax_decode_merge_kernel[(b * hq * lq, triton.cdiv(dv, merge_dv))](
            part_m, part_d1, part_d2, part_o1, part_o2, out,
            out.stride(0), out.stride(1), out.stride(2), splits, hq, lq,
            DV=dv, BLOCK_S=block_s, BLOCK_DV=merge_dv, CHUNK_S=chunk_s, PDL=pdl,
            num_warps=4, **({"launch_pdl": True} if pdl else {}),
        )
    return out
