"""Portable PyTorch implementation of the Parallax op: forward and backward, bounded memory.

This is the implementation every device gets unless a faster kernel is registered for it (the
Triton kernels register themselves for CUDA). It streams over *query* chunks: at most
``chunk x Lk`` scores per (batch, head) are alive at once, never ``Lq x Lk`` (SPEC section 3
computed chunk-wise; SPEC section 4 written out). All statistics and accumulators are fp32 whatever
the input dtype (fp32, fp16, bf16).

Saved for backward (SPEC section 4): ``out``, ``mu_v`` (= O1/d1) in the input dtype, and per row
``lse = m + log(d1)`` and ``c = d2/d1`` in fp32. ``lse = +inf`` marks a row with no allowed key,
so that ``exp(l - lse) = 0`` there (the Triton backward relies on it; this one recomputes the
row softmax, see :func:`_softmax_rows`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Upper bound on the bytes of one fp32 ``[B, Hq, chunk, Lk]`` score block. The forward keeps about
# five such blocks alive and the backward about eight, so peak extra memory stays a small multiple.
SCORE_BLOCK_BYTES = 32 * 2**20


def acc_dtype(dtype: torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16/bf16 inputs; for fp32 inputs fp32 on accelerators and
    fp64 on the CPU (the CPU path is the correctness path: a deep fp32 model such as Gemma 3
    amplifies ulp-level differences ~20x, and exact accumulation keeps a converted model within
    1e-5 of the original); fp64 for fp64 inputs (gradcheck)."""
    if dtype == torch.float32 and device is not None and device.type == "cpu":
        return torch.float64
    return torch.promote_types(dtype, torch.float32)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved row statistics ``lse`` and ``c``: fp32 (fp64 for fp64 inputs)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_rows(batch: int, heads: int, lk: int, acc: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=acc).element_size()
    return max(1, SCORE_BLOCK_BYTES // max(1, itemsize * batch * heads * lk))


def _grouped(x: Tensor, hkv: int) -> Tensor:
    """``[B, Hq, L, D] -> [B, Hkv, G, L, D]`` (query head ``h`` belongs to KV head ``h // G``)."""
    b, hq, l, d = x.shape
    return x.reshape(b, hkv, hq // hkv, l, d)


def _mask_block(attn_mask: Tensor | None, hkv: int, hq: int, i0: int, i1: int) -> Tensor | None:
    """Rows ``[i0, i1)`` of a mask broadcastable to ``[B, Hq, Lq, Lk]``, as ``[B|1, Hkv|1, G|1, C|1, Lk|1]``."""
    if attn_mask is None:
        return None
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.shape[2] != 1:
        m = m[:, :, i0:i1]
    if m.shape[1] == 1:
        return m.unsqueeze(1)
    return m.reshape(m.shape[0], hkv, hq // hkv, *m.shape[2:])


def _logits_block(qc, k, mask, *, scale, causal, window_size, i0, lq, lk):
    """Scaled, masked fp32 logits of query rows ``[i0, i0 + C)``: ``[B, Hkv, G, C, Lk]``."""
    logits = torch.matmul(qc, k.unsqueeze(2).transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        logits = logits + mask.to(logits.dtype)
        rounded = torch.promote_types(mask.dtype, torch.float32)
        if rounded != logits.dtype:
            # fp32 inputs on the CPU accumulate in fp64, but ``logits + mask`` is rounded as the fp32
            # model rounds it: a row of ``finfo.min`` (or -1e9) masks collapses to equal logits
            # (uniform weights) there, and must here too.
            logits = logits.to(rounded).to(logits.dtype)
    keep = None
    if causal or window_size is not None:
        i = torch.arange(i0, i0 + qc.shape[-2], device=qc.device)[:, None] + (lk - lq)
        j = torch.arange(lk, device=qc.device)[None, :]
        keep = torch.ones(i.shape[0], lk, dtype=torch.bool, device=qc.device)
        if causal:
            keep = keep & (j <= i)
        if window_size is not None:
            keep = keep & (j > i - window_size)
            if not causal:
                keep = keep & (j < i + window_size)
    if mask is not None and mask.dtype == torch.bool:
        keep = mask if keep is None else keep & mask
    if keep is not None:
        logits = logits.masked_fill(~keep, -math.inf)
    return logits


def parallax_fwd(
    q: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    causal: bool,
    window_size: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward. Returns ``(out, mu_v, lse, c)``: ``[B, Hq, Lq, Dv]`` twice in ``q``'s dtype, then
    ``[B, Hq, Lq]`` twice in fp32."""
    b, hq, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    acc = acc_dtype(q.dtype, q.device)
    kf, vf = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)  # [B, Hkv, 1, Lk, D]
    qg, rg = _grouped(q, hkv), _grouped(r, hkv)
    out = q.new_empty(b, hq, lq, dv)
    mu_v = q.new_empty(b, hq, lq, dv)
    lse = q.new_empty(b, hq, lq, dtype=stats_dtype(q.dtype))
    c_out = q.new_empty(b, hq, lq, dtype=stats_dtype(q.dtype))
    og, mg = _grouped(out, hkv), _grouped(mu_v, hkv)
    lse_g, c_g = lse.view(b, hkv, hq // hkv, lq), c_out.view(b, hkv, hq // hkv, lq)
    if lk == 0:  # no key at all: every row is empty
        out.zero_(), mu_v.zero_(), lse.fill_(math.inf), c_out.zero_()
        return out, mu_v, lse, c_out
    step = _chunk_rows(b, hq, lk, acc)
    for i0 in range(0, lq, step):
        i1 = min(lq, i0 + step)
        qc, rc = qg[..., i0:i1, :].to(acc), rg[..., i0:i1, :].to(acc)
        o, mu, row_lse, c = forward_block(
            qc, rc, kf, vf, _mask_block(attn_mask, hkv, hq, i0, i1),
            scale=scale, causal=causal, window_size=window_size, i0=i0, lq=lq, lk=lk,
        )
        og[..., i0:i1, :] = o
        mg[..., i0:i1, :] = mu
        lse_g[..., i0:i1] = row_lse
        c_g[..., i0:i1] = c
    return out, mu_v, lse, c_out


def _finite(x: Tensor) -> Tensor:
    """``isfinite(x)`` as ``x - x == 0`` (inf - inf and NaN give NaN): the same mask, in ops that
    torch-mlir lowers to linalg (``forward_block`` is the MLIR exporter's decomposition)."""
    return (x - x) == 0


def forward_block(qc, rc, kf, vf, mask, *, scale, causal, window_size, i0, lq, lk):
    """The forward of query rows ``[i0, i0 + C)`` in the grouped layout, in the inputs' dtype:
    ``qc, rc [B, Hkv, G, C, D]``, ``kf [B, Hkv, 1, Lk, D]``, ``vf [B, Hkv, 1, Lk, Dv]``, ``mask``
    from :func:`_mask_block`. Returns ``out, mu_v [B, Hkv, G, C, Dv]`` and ``lse, c [B, Hkv, G, C]``
    (SPEC section 3: one pass over the keys; a row with no allowed key gives 0, ``lse = +inf``).
    Also the decomposition the MLIR exporter lowers the op to (one block, ``i0 = 0``)."""
    logits = _logits_block(qc, kf.squeeze(2), mask, scale=scale, causal=causal, window_size=window_size,
                           i0=i0, lq=lq, lk=lk)
    m = logits.amax(-1, keepdim=True)
    empty = m == -math.inf
    p = torch.exp(logits - torch.where(empty, torch.zeros_like(m), m))
    g = torch.matmul(rc, kf.transpose(-1, -2))
    masked = mask is not None or causal or window_size is not None
    allowed = logits > -math.inf if masked else None
    del logits
    pg = p * g if allowed is None else torch.where(allowed, p * g, 0.0)  # a masked key's NaN k: 0
    del g
    d1 = p.sum(-1, keepdim=True)
    d2 = pg.sum(-1, keepdim=True)
    vs, hit = vf, None
    if masked:  # a masked key's non-finite v must not reach the row (0 * NaN = NaN in a GEMM)
        bad = ~_finite(vf)
        vs = torch.where(bad, 0.0, vf)
        hit = torch.matmul(allowed.to(vf.dtype), bad.to(vf.dtype)) > 0  # [.., C, Dv]: reads a bad v
    o1 = torch.matmul(p, vs)
    del p
    o2 = torch.matmul(pg, vs)
    del pg
    if hit is not None:
        o1, o2 = torch.where(hit, math.nan, o1), torch.where(hit, math.nan, o2)
    inv = torch.where(empty, torch.zeros_like(d1), 1.0 / torch.where(empty, torch.ones_like(d1), d1))
    mu = o1 * inv
    c = d2 * inv
    lse = torch.where(empty, math.inf, m + torch.log(d1))
    return mu * (1 + c) - o2 * inv, mu, lse.squeeze(-1), c.squeeze(-1)


def _softmax_rows(logits: Tensor) -> Tensor:
    """Softmax weights of full rows (0 for a row with no allowed key). The backward holds whole
    rows anyway, so it recomputes them instead of using ``exp(l - lse)``: exact also for rows
    whose every logit is ``finfo.min``-padded, where ``lse = finfo.min + log(d1)`` rounds away
    ``log(d1)``."""
    m = logits.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    p = torch.exp(logits - m)
    d1 = p.sum(-1, keepdim=True)
    return p / torch.where(d1 == 0, torch.ones_like(d1), d1)


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a ``[B, Hq, C, Lk]`` gradient block down to a broadcastable mask ``shape`` (its row
    dim is kept at ``C`` unless the mask broadcasts over rows)."""
    lead = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(lead))) if lead else grad
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


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
    scale: float,
    causal: bool,
    window_size: int | None,
    mask_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Backward of SPEC section 4. Returns ``(dq, dr, dk, dv, d_mask)``; ``d_mask`` (the gradient
    of an additive mask, shaped like it) only when ``mask_needs_grad``."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype, q.device)
    kf, vf = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    qg, rg = _grouped(q, hkv), _grouped(r, hkv)
    dog, og, mug = _grouped(grad_out, hkv), _grouped(out, hkv), _grouped(mu_v, hkv)
    c_g = c.view(b, hkv, hq // hkv, lq, 1)
    dq, dr = q.new_empty(q.shape), r.new_empty(r.shape)
    dqg, drg = _grouped(dq, hkv), _grouped(dr, hkv)
    dk_acc = torch.zeros(b, hkv, lk, d, dtype=acc, device=q.device)
    dv_acc = torch.zeros(b, hkv, lk, v.shape[-1], dtype=acc, device=q.device)
    d_mask_rows = []
    if lk == 0 or lq == 0:  # nothing attended: the forward gave zeros (or nothing)
        d_mask = torch.zeros_like(attn_mask) if mask_needs_grad else None
        return q.new_zeros(q.shape), r.new_zeros(r.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), d_mask
    masked = attn_mask is not None or causal or window_size is not None
    if masked:  # a masked key's non-finite k / v must not reach the gradients (0 * NaN in a GEMM)
        kf, vf = (torch.where(_finite(x), x, 0.0) for x in (kf, vf))
    step = _chunk_rows(b, hq, lk, acc)
    for i0 in range(0, lq, step):
        i1 = min(lq, i0 + step)
        qc, rc = qg[..., i0:i1, :].to(acc), rg[..., i0:i1, :].to(acc)
        do, o, mu = (x[..., i0:i1, :].to(acc) for x in (dog, og, mug))
        cc = c_g[..., i0:i1, :]
        logits = _logits_block(
            qc, kf.squeeze(2), _mask_block(attn_mask, hkv, hq, i0, i1),
            scale=scale, causal=causal, window_size=window_size, i0=i0, lq=lq, lk=lk,
        )
        s = _softmax_rows(logits)
        del logits
        g = torch.matmul(rc, kf.transpose(-1, -2))
        a = s * (1 + cc - g)
        dv_acc += torch.matmul(a.transpose(-1, -2), do).sum(2)
        del a
        da = torch.matmul(do, vf.transpose(-1, -2))
        dc = (do * mu).sum(-1, keepdim=True)
        dr_row = (do * o).sum(-1, keepdim=True) + cc * dc
        dp = da * (1 + cc - g) + dc * g
        del g
        ds = s * (dp - dr_row)
        del dp
        dg = s * (dc - da)
        del s, da
        dqg[..., i0:i1, :] = (torch.matmul(ds, kf) * scale).to(dq.dtype)
        drg[..., i0:i1, :] = torch.matmul(dg, kf).to(dr.dtype)
        dk_acc += (torch.matmul(ds.transpose(-1, -2), qc) * scale + torch.matmul(dg.transpose(-1, -2), rc)).sum(2)
        if mask_needs_grad:
            d_mask_rows.append(_reduce_to(ds.reshape(b, hq, i1 - i0, lk), attn_mask.shape))
    d_mask = None
    if mask_needs_grad:
        rows_broadcast = attn_mask.dim() < 2 or attn_mask.shape[-2] == 1
        d_mask = sum(d_mask_rows) if rows_broadcast else torch.cat(d_mask_rows, dim=-2)
        d_mask = d_mask.to(attn_mask.dtype)
    return dq, dr, dk_acc.to(k.dtype), dv_acc.to(v.dtype), d_mask
