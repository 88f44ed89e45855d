"""The attention family of SPEC section 2 as one reference API and one op configuration.

Every member is a point in three axes (:class:`FamilyMember`):

* ``bandwidth`` -- a temperature on the logits, ``l_ij / bandwidth`` (masks included);
  ``math.inf`` gives uniform weights over the allowed keys ``J(i)`` (the kernel-regression
  bandwidth -> infinity limit);
* ``probe`` -- ``"zero"`` (``r = 0``), ``"learned"`` (``r`` given, e.g. ``W_R x``) or ``"solved"``
  (LLA's ``rho_i = (C_kk,i + ridge I)^-1 (mu_k,i - q_i)``, needs ``ridge``);
* ``intercept`` -- the affine (centred) correction ``o = mu_v - C_vk r`` (effective weights
  ``s_ij (1 + c_i - g_ij)``, summing to 1), or without the intercept the linear correction
  ``o = sum_j s_ij (1 - g_ij) v_j`` (weights summing to ``1 - c_i``).

Named members: :data:`SOFTMAX` (zero probe), :data:`PARALLAX` (learned probe),
:func:`lla` (solved probe; ``ridge -> inf`` gives softmax), :data:`AFFINE_LINEAR` (learned probe,
infinite bandwidth). :func:`family_attention_ref` evaluates a member in float64 from the oracles
of :mod:`parallax_compile.reference`; :func:`family_attention` runs it through the single
``torch.ops.parallax.attention`` node (:func:`op_arguments` says how each axis maps onto the op's
arguments and outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import _repeat_kv, attention_logits, lla_probe_ref, parallax_attention_ref, softmax_weights

__all__ = ["AFFINE_LINEAR", "PARALLAX", "SOFTMAX", "FamilyMember", "family_attention", "family_attention_ref",
           "lla", "op_arguments"]

PROBES = ("zero", "learned", "solved")


@dataclass(frozen=True)
class FamilyMember:
    """One estimator of the family (SPEC section 2). Raises ``ValueError`` on an invalid combination."""

    bandwidth: float = 1.0
    probe: str = "zero"
    intercept: bool = True
    ridge: float | None = None

    def __post_init__(self):
        if not self.bandwidth > 0:
            raise ValueError(f"FamilyMember: bandwidth must be > 0 (math.inf for uniform weights), got {self.bandwidth}")
        if self.probe not in PROBES:
            raise ValueError(f"FamilyMember: probe must be one of {PROBES}, got {self.probe!r}")
        if self.probe == "solved" and (self.ridge is None or not self.ridge > 0):
            raise ValueError(f"FamilyMember: probe='solved' needs ridge > 0, got {self.ridge}")
        if self.probe == "solved" and not self.intercept:
            raise ValueError("FamilyMember: the solved probe is LLA's, defined with the intercept "
                             "(without it the local linear fit predicts 0 at the query)")


SOFTMAX = FamilyMember()
PARALLAX = FamilyMember(probe="learned")
AFFINE_LINEAR = FamilyMember(bandwidth=math.inf, probe="learned")


def lla(ridge: float, bandwidth: float = 1.0) -> FamilyMember:
    """Local Linear Attention with ridge ``lambda = ridge`` (SPEC section 2)."""
    return FamilyMember(bandwidth=bandwidth, probe="solved", ridge=ridge)


def _tempered(scale, attn_mask, bandwidth, d):
    """Scale and mask of the logits divided by ``bandwidth`` (``inf``: 0, keeping only ``-inf``)."""
    scale = d**-0.5 if scale is None else scale
    if math.isinf(bandwidth):
        scale = 0.0
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask > -math.inf
    elif bandwidth != 1.0:
        scale = scale / bandwidth
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask / bandwidth
    return scale, attn_mask


def _check_probe(member: FamilyMember, r: Tensor | None) -> None:
    if member.probe == "learned" and r is None:
        raise ValueError("family attention: probe='learned' needs r [B, Hq, Lq, D]")
    if member.probe != "learned" and r is not None:
        raise ValueError(f"family attention: probe={member.probe!r} takes no r")


def op_arguments(member: FamilyMember, q: Tensor, k: Tensor, r: Tensor | None = None, *,
                 scale: float | None = None, attn_mask: Tensor | None = None) -> dict:
    """The op's ``r``, ``scale`` and ``attn_mask`` for ``member``: bandwidth divides the scale and
    an additive mask (``inf``: scale 0, mask reduced to its ``-inf`` pattern), the probe is 0 /
    ``r`` / LLA's solved probe (computed by :func:`~parallax_compile.reference.lla_probe_ref` on the
    tempered logits, differentiable). ``intercept=False`` is applied after the op:
    ``out - (r . mu_k) mu_v`` (see :func:`family_attention`)."""
    _check_probe(member, r)
    scale, attn_mask = _tempered(scale, attn_mask, member.bandwidth, q.shape[-1])
    if member.probe == "zero":
        r = torch.zeros_like(q)
    elif member.probe == "solved":
        r = lla_probe_ref(q, k, ridge=member.ridge, scale=scale, attn_mask=attn_mask)
    return {"r": r, "scale": scale, "attn_mask": attn_mask}


def family_attention(q: Tensor, k: Tensor, v: Tensor, member: FamilyMember, r: Tensor | None = None, *,
                     scale: float | None = None, causal: bool = False, window_size: int | None = None,
                     attn_mask: Tensor | None = None) -> Tensor:
    """``member`` through ``torch.ops.parallax.attention``: shapes, dtypes, masks and errors as
    :func:`parallax_compile.parallax_attention` (``q``/``r`` ``[B, Hq, Lq, D]``, ``k``/``v``
    ``[B, Hkv, Lk, D|Dv]``). Returns ``[B, Hq, Lq, Dv]``. For the solved probe the causal/window
    pattern must be in ``attn_mask`` (the solve sees only the mask) -- ``causal``/``window_size``
    raise ``ValueError`` there."""
    if member.probe == "solved" and (causal or window_size is not None):
        raise ValueError("family_attention: with probe='solved' pass the causal/window pattern as attn_mask")
    a = op_arguments(member, q, k, r, scale=scale, attn_mask=attn_mask)
    args = (a["attn_mask"], a["scale"], causal, window_size)
    out = torch.ops.parallax.attention(q, a["r"], k, v, *args)[0]
    if not member.intercept:
        # out - c mu_v with c_i = r_i . mu_k,i; mu_v and mu_k from r = 0 calls so gradients flow
        # (the op's own mu_v and c outputs are statistics, not differentiable).
        zero = torch.zeros_like(q)
        mu_v = torch.ops.parallax.attention(q, zero, k, v, *args)[0]
        mu_k = torch.ops.parallax.attention(q, zero, k, k, *args)[0]
        out = out - (a["r"] * mu_k).sum(-1, keepdim=True) * mu_v
    return out


def family_attention_ref(q: Tensor, k: Tensor, v: Tensor, member: FamilyMember, r: Tensor | None = None, *,
                         scale: float | None = None, causal: bool = False, window_size: int | None = None,
                         attn_mask: Tensor | None = None) -> Tensor:
    """``member`` from the float64-capable oracles (pass float64 tensors): the covariance form
    :func:`~parallax_compile.reference.parallax_attention_ref` with the member's probe, or, without
    the intercept, ``sum_j s_ij (1 - r_i . k_j) v_j``. ``[B, Hq, Lq, Dv]``."""
    _check_probe(member, r)
    kw = {"causal": causal, "window_size": window_size}
    scale, attn_mask = _tempered(scale, attn_mask, member.bandwidth, q.shape[-1])
    if member.probe == "zero":
        r = torch.zeros_like(q)
    elif member.probe == "solved":
        r = lla_probe_ref(q, k, ridge=member.ridge, scale=scale, attn_mask=attn_mask, **kw)
    if member.intercept:
        return parallax_attention_ref(q, r, k, v, scale=scale, attn_mask=attn_mask, **kw)
    s = softmax_weights(attention_logits(q, k, scale=scale, attn_mask=attn_mask, **kw))
    g = r @ _repeat_kv(k, q.shape[1]).transpose(-1, -2)
    return (s * (1 - g)) @ _repeat_kv(v, q.shape[1])
