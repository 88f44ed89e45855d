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

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) bf16 GEMM operands are upcast to fp32 (Triton
3.7's interpreter multiplies bf16 as raw uint16) and the autotuner is bypassed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_parallax import _dot  # the one fp32-accumulating tile GEMM (interpreter bf16 upcast)

__all__ = [
    "parallax_decode",
    "parallax_decode_fwd_kernel",
    "parallax_decode_merge_kernel",
    "pick_num_splits",
    "supports",
]

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Fill fresh allocations with NaN, so an element the kernels forget to write cannot pass a test.
POISON = os.environ.get("PARALLAX_TRITON_POISON", "0") not in ("", "0")
MAX_HEAD_DIM = 256
MAX_GROUP_ROWS = 64
# `PARALLAX_DECODE_STACK=0`: two GEMMs per product (q K^T and r K^T; p V and (p*g) V) on the same
# K/V registers instead of one GEMM on the stacked [q; r] tile (same HBM traffic; a fallback and a
# comparison point for the benchmark).
STACK = os.environ.get("PARALLAX_DECODE_STACK", "1") not in ("", "0")  # G * Lq rows per program (q rows; the tile holds twice that)
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


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in _TILES]


def _prune(configs, named_args, **kwargs):
    """Keep the configurations whose K/V pipeline stages fit in shared memory (the smallest one when
    none does); only the first of them with ``PARALLAX_TRITON_AUTOTUNE=0``."""
    d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    dv = kwargs.get("BLOCK_DV", named_args.get("BLOCK_DV", 128))
    item = named_args["k"].element_size() if hasattr(named_args.get("k"), "element_size") else 2

    def footprint(c):
        return c.num_stages * c.kwargs["BLOCK_N"] * (d + dv) * item

    keep = [c for c in configs if footprint(c) <= SMEM_BUDGET] or [min(configs, key=footprint)]
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


@triton.autotune(configs=_configs(), key=["D", "DV", "G", "LQ", "PAGED", "SPLIT", "STACK", "TILES"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def parallax_decode_fwd_kernel(
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
    PREC: tl.constexpr, UPCAST: tl.constexpr, STACK: tl.constexpr, BLOCK_N: tl.constexpr,
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


@triton.jit
def parallax_decode_merge_kernel(
    part_m, part_d1, part_d2, part_o1, part_o2, o,
    stride_ob, stride_oh, stride_ol, num_splits, HQ, LQ,
    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK_S: tl.constexpr,
):
    """Grid ``(B * Hq * Lq,)``: merge the splits of one row exactly (SPEC section 3): global max
    over the splits, then ``CHUNK_S`` splits at a time rescaled by ``exp2(m_split - m_max)`` and summed."""
    i_row = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, BLOCK_S)
    b_mmax = tl.max(tl.load(part_m + i_row * num_splits + o_s, mask=o_s < num_splits, other=float("-inf")), 0)
    b_mref = tl.where(b_mmax == float("-inf"), 0.0, b_mmax)
    o_c = tl.arange(0, CHUNK_S)
    o_dv = tl.arange(0, BLOCK_DV)
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


def pick_num_splits(batch: int, hkv: int, l_max: int, sm_count: int) -> int:
    """Splits per (sequence, KV head): enough programs for about 4 per SM (``4 * sm_count``),
    each split at least 2 granules (``2 * SPLIT_GRANULE`` keys) long."""
    granules = triton.cdiv(max(l_max, 1), SPLIT_GRANULE)
    want = triton.cdiv(4 * sm_count, max(1, batch * hkv))
    return max(1, min(want, triton.cdiv(granules, 2), 256))


def _empty(*shape, dtype, device) -> Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan"))
    return out


def parallax_decode(q: Tensor, r: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                    block_table: Tensor | None, scale: float, window_size: int | None,
                    num_splits: int | None = None) -> Tensor:
    """Launch the decode kernel (and the merge when split). Arguments as
    :func:`parallax_compile.decode.parallax_attention_with_kvcache` (already checked), ``scale``
    resolved to a float. Returns ``[B, Hq, Lq, Dv]`` in ``q``'s dtype."""
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
    splits = num_splits or pick_num_splits(b, hkv, l_max, _sm_count(q.device))
    chunk = triton.cdiv(triton.cdiv(max(l_max, 1), splits), SPLIT_GRANULE) * SPLIT_GRANULE
    splits = max(1, triton.cdiv(max(l_max, 1), chunk))  # no split starts past L_max
    stack = STACK
    block_m = max(8 if stack else 16, triton.next_power_of_2(g * lq))
    split = splits > 1
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
    parallax_decode_fwd_kernel[(splits, hkv, b)](
        q, r, k_cache, v_cache, bt, cache_seqlens, out, part_m, part_d1, part_d2, part_o1, part_o2,
        q.stride(0), q.stride(1), q.stride(2),
        r.stride(0), r.stride(1), r.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        bt.stride(0) if paged else 0, k_cache.shape[2] if paged else 1, chunk, splits,
        scale * LOG2E, window_size if window_size is not None else 0,
        1 if chunk // SPLIT_GRANULE < 8 else 8,  # autotune bucket: short or long splits
        G=g, LQ=lq, D=d, DV=dv, BLOCK_M=block_m, BLOCK_D=_block(d), BLOCK_DV=_block(dv),
        HAS_WINDOW=window_size is not None, PAGED=paged, SPLIT=split,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET and q.dtype == torch.bfloat16, STACK=stack,
    )
    if split:
        parallax_decode_merge_kernel[(b * hq * lq,)](
            part_m, part_d1, part_d2, part_o1, part_o2, out,
            out.stride(0), out.stride(1), out.stride(2), splits, hq, lq,
            DV=dv, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_DV=_block(dv), CHUNK_S=8,
            num_warps=4,
        )
    return out
