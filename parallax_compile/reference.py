"""Float64-capable oracles for the Parallax family (SPEC sections 1, 2 and 5).

Everything here is written for clarity, not speed: it materialises the full ``[B, H, Lq, Lk]``
weights (and, for the covariance form, per-query ``D x D`` matrices), so keep shapes tiny.
Tests compare the op and the kernels against these functions, usually in float64.

Conventions (SPEC section 5):

* layout ``[B, H, L, D]``; ``q`` and ``r`` have ``Hq`` heads, ``k`` and ``v`` have ``Hkv`` heads,
  ``Hq % Hkv == 0`` and query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA);
* ``causal`` is aligned to the *end* of the keys: query row ``i`` sees keys
  ``j <= i + Lk - Lq`` (FlashAttention's convention with a KV cache);
* ``window_size=W``: row ``i`` sees keys ``j > i' - W`` (and, when not causal, ``j < i' + W``)
  where ``i' = i + Lk - Lq`` is the aligned position;
* ``attn_mask``: boolean (``True`` = keep) or additive float, broadcastable to
  ``[B, Hq, Lq, Lk]``, added to the *scaled* logits (``scaled_dot_product_attention``'s rule);
* a row with no allowed key (every logit ``-inf``) has weights 0 and output 0, never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "allowed_keys",
    "attention_logits",
    "softmax_weights",
    "softmax_attention_ref",
    "parallax_attention_ref",
    "effective_weights_ref",
    "lla_probe_ref",
    "lla_attention_ref",
    "lla_cg_attention_ref",
    "cross_covariance_ref",
    "conjugate_gradient",
    "stationary_iteration",
]


def allowed_keys(
    lq: int,
    lk: int,
    *,
    causal: bool = False,
    window_size: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean ``[Lq, Lk]`` pattern of the keys each query row may see (True = allowed).

    Causal is end-aligned (row ``i`` sees ``j <= i + Lk - Lq``); a window ``W`` keeps
    ``j > i' - W`` and, without ``causal``, also ``j < i' + W`` (SPEC section 5).
    """
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        keep = keep & (j <= i)
    if window_size is not None:
        keep = keep & (j > i - window_size)
        if not causal:
            keep = keep & (j < i + window_size)
    return keep


def _repeat_kv(x: Tensor, hq: int) -> Tensor:
    """``[B, Hkv, L, D] -> [B, Hq, L, D]``: query head ``h`` reads KV head ``h // (Hq // Hkv)``."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def attention_logits(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Masked, scaled logits ``l_ij = scale * q_i . k_j (+ mask)``, ``-inf`` where not allowed.

    Shapes: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]`` -> ``[B, Hq, Lq, Lk]`` in ``q``'s dtype
    (pass float64 tensors for an oracle). ``scale`` defaults to ``D ** -0.5``.
    """
    lq, d = q.shape[-2], q.shape[-1]
    lk = k.shape[-2]
    scale = d**-0.5 if scale is None else scale
    logits = scale * (q @ _repeat_kv(k, q.shape[1]).transpose(-1, -2))
    keep = allowed_keys(lq, lk, causal=causal, window_size=window_size, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            logits = logits + attn_mask.to(logits.dtype)
    return logits.masked_fill(~keep, -math.inf)


def softmax_weights(logits: Tensor) -> Tensor:
    """Row softmax over the last dim; rows whose logits are all ``-inf`` get weights 0."""
    m = logits.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    p = torch.exp(logits - m)
    d1 = p.sum(-1, keepdim=True)
    return p / torch.where(d1 == 0, torch.ones_like(d1), d1)


def softmax_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Softmax attention ``mu_v_i = sum_j s_ij v_j`` (SPEC section 2, first row). ``[B, Hq, Lq, Dv]``."""
    s = softmax_weights(
        attention_logits(q, k, scale=scale, causal=causal, window_size=window_size, attn_mask=attn_mask)
    )
    return s @ _repeat_kv(v, q.shape[1])


def _moments(q, k, v, *, scale, causal, window_size, attn_mask):
    s = softmax_weights(
        attention_logits(q, k, scale=scale, causal=causal, window_size=window_size, attn_mask=attn_mask)
    )
    kr, vr = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    mu_k, mu_v = s @ kr, s @ vr
    return s, kr, vr, mu_k, mu_v


def parallax_attention_ref(
    q: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Parallax in covariance form: ``o_i = mu_v_i - C_vk,i r_i`` (SPEC section 2, paper eq. for Parallax).

    ``C_vk,i r_i = sum_j s_ij (v_j - mu_v_i) ((k_j - mu_k_i) . r_i)``: centred keys projected on
    the probe, centred values, weighted by the softmax. Materialises ``[B, Hq, Lq, Lk]`` (no
    ``D x D`` matrices), so it also serves as the oracle on real-model shapes. ``r`` is shaped like
    ``q`` and is **not** multiplied by ``scale``. ``r = 0`` gives :func:`softmax_attention_ref` exactly.
    """
    s, kr, vr, mu_k, mu_v = _moments(
        q, k, v, scale=scale, causal=causal, window_size=window_size, attn_mask=attn_mask
    )
    proj = r @ kr.transpose(-1, -2) - (mu_k * r).sum(-1, keepdim=True)  # (k_j - mu_k_i) . r_i
    w = s * proj
    correction = w @ vr - mu_v * w.sum(-1, keepdim=True)  # sum_j s_ij proj_ij (v_j - mu_v_i)
    return mu_v - correction


def cross_covariance_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(mu_v [B, Hq, Lq, Dv], C_vk [B, Hq, Lq, Dv, D])`` with ``C_vk,i = sum_j s_ij (v_j - mu_v_i)(k_j - mu_k_i)^T``
    (SPEC section 2), so that Parallax's output is ``mu_v - C_vk @ r`` for any probe ``r``: a map
    linear in ``r``, which is what fitting a probe needs. Materialises ``Dv x D`` per query."""
    s, kr, vr, mu_k, mu_v = _moments(
        q, k, v, scale=scale, causal=causal, window_size=window_size, attn_mask=attn_mask
    )
    vk = (vr[..., :, None] * kr[..., None, :]).flatten(-2)  # [B, H, Lk, Dv*D]
    c_vk = (s @ vk).unflatten(-1, (vr.shape[-1], kr.shape[-1])) - mu_v[..., :, None] * mu_k[..., None, :]
    return mu_v, c_vk


def effective_weights_ref(
    q: Tensor,
    r: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Parallax's effective weights ``A_ij = s_ij (1 + c_i - g_ij)`` with ``g_ij = r_i . k_j`` and
    ``c_i = sum_j s_ij g_ij`` (SPEC section 2). ``o_i = sum_j A_ij v_j``; each non-empty row sums to 1.
    """
    s = softmax_weights(
        attention_logits(q, k, scale=scale, causal=causal, window_size=window_size, attn_mask=attn_mask)
    )
    g = r @ _repeat_kv(k, q.shape[1]).transpose(-1, -2)
    c = (s * g).sum(-1, keepdim=True)
    return s * (1 + c - g)


def lla_probe_ref(
    q: Tensor,
    k: Tensor,
    *,
    ridge: float,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
    attn_mask: Tensor | None = None,
    cg_iters: int | None = None,
    loop: str = "cg",
    omega: float | None = None,
) -> Tensor:
    """LLA's solved probe ``rho_i = (C_kk,i + ridge I)^-1 (mu_k_i - q_i)`` (SPEC section 2). ``[B, Hq, Lq, D]``.

    ``cg_iters=None`` solves exactly (``torch.linalg.solve``); ``cg_iters=n`` runs ``n`` steps of a
    fixed-iteration loop from 0 instead: ``loop="cg"`` :func:`conjugate_gradient`, as FlashLLA does
    (exact after ``D`` steps in exact arithmetic), ``"jacobi"`` or ``"richardson"`` (step ``omega``)
    :func:`stationary_iteration`. Raises ``ValueError`` for another ``loop`` or a Richardson loop
    without ``omega``.
    """
    s, kr, _, mu_k, _ = _moments(
        q, k, k, scale=scale, causal=causal, window_size=window_size, attn_mask=attn_mask
    )
    c_kk = torch.einsum("bhij,bhjd,bhje->bhide", s, kr, kr) - mu_k[..., :, None] * mu_k[..., None, :]
    if cg_iters is not None:
        matvec = lambda p: (c_kk @ p[..., None]).squeeze(-1) + ridge * p  # noqa: E731
        if loop == "cg":
            return conjugate_gradient(matvec, mu_k - q, cg_iters)
        if loop == "jacobi":
            diag = c_kk.diagonal(dim1=-2, dim2=-1) + ridge
            return stationary_iteration(matvec, mu_k - q, cg_iters, lambda res: res / diag)
        if loop == "richardson" and omega is not None:
            return stationary_iteration(matvec, mu_k - q, cg_iters, lambda res: omega * res)
        raise ValueError(f"lla_probe_ref: loop must be 'cg', 'jacobi' or 'richardson' (with omega), "
                         f"got {loop!r}")
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(c_kk + ridge * eye, (mu_k - q)[..., None]).squeeze(-1)


def conjugate_gradient(matvec, b: Tensor, iters: int) -> Tensor:
    """``iters`` conjugate-gradient steps for ``A x = b`` from ``x = 0`` over the last dim of ``b``
    (``A`` symmetric positive definite, given as ``matvec(p) = A p``). A converged row stays put
    (its step sizes are 0, never NaN)."""
    x = torch.zeros_like(b)
    res, p = b, b
    rs = (res * res).sum(-1, keepdim=True)
    for _ in range(iters):
        ap = matvec(p)
        pap = (p * ap).sum(-1, keepdim=True)
        alpha = torch.where(pap > 0, rs / torch.where(pap > 0, pap, 1), 0)
        x = x + alpha * p
        res = res - alpha * ap
        rs_new = (res * res).sum(-1, keepdim=True)
        p = res + torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, 1), 0) * p
        rs = rs_new
    return x


def stationary_iteration(matvec, b: Tensor, iters: int, step) -> Tensor:
    """``iters`` steps of ``x <- x + step(b - A x)`` from ``x = 0`` (``A`` given as ``matvec(p) = A p``):
    Jacobi with ``step(res) = res / diag(A)``, Richardson with ``step(res) = omega * res``."""
    x = torch.zeros_like(b)
    for _ in range(iters):
        x = x + step(b - matvec(x))
    return x


def lla_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    ridge: float,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Local Linear Attention as exact weighted ridge regression (SPEC section 2; LLA paper).

    For each query ``i``, regress ``v_j`` on ``[1, k_j - q_i]`` with weights ``s_ij`` and a ridge
    ``ridge * ||B||^2`` on the slope only (unpenalised intercept); the output is the fitted
    intercept, i.e. the local linear prediction at the query. Solved through the normal equations
    of size ``D + 1`` per query (independent of the covariance formula used by Parallax).
    Rows with no allowed key give 0.
    """
    s = softmax_weights(
        attention_logits(q, k, scale=scale, causal=causal, window_size=window_size, attn_mask=attn_mask)
    )
    kr, vr = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    x = kr[..., None, :, :] - q[..., :, None, :]  # [B, H, Lq, Lk, D]
    x = torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)  # [B, H, Lq, Lk, D+1]
    xs = x * s[..., None]
    gram = xs.transpose(-1, -2) @ x  # [B, H, Lq, D+1, D+1]
    pen = torch.full((q.shape[-1] + 1,), ridge, dtype=q.dtype, device=q.device)
    pen[0] = 0
    rhs = xs.transpose(-1, -2) @ vr[..., None, :, :]  # [B, H, Lq, D+1, Dv]
    empty = (s.sum(-1) == 0)[..., None, None]
    # An empty row has an all-zero Gram matrix; give it the identity so the solve is defined.
    gram = torch.where(empty, torch.eye(gram.shape[-1], dtype=q.dtype, device=q.device), gram)
    beta = torch.linalg.solve(gram + torch.diag(pen), rhs)
    return beta[..., 0, :]


def lla_cg_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    ridge: float,
    cg_iters: int,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """LLA with the solve replaced by ``cg_iters`` conjugate-gradient steps (FlashLLA's form):
    ``parallax_attention_ref(q, rho_cg, k, v)`` with ``rho_cg = lla_probe_ref(..., cg_iters=cg_iters)``
    (SPEC section 2: the intercept output with probe ``rho`` is Parallax's formula). Converges to
    :func:`lla_attention_ref` as ``cg_iters`` grows (exact at ``cg_iters >= D`` up to rounding).
    """
    kw = dict(scale=scale, causal=causal, window_size=window_size, attn_mask=attn_mask)
    rho = lla_probe_ref(q, k, ridge=ridge, cg_iters=cg_iters, **kw)
    return parallax_attention_ref(q, rho, k, v, **kw)
