"""The ``parallax`` attention implementation for transformers' ``AttentionInterface``.

Registered under the name ``"parallax"`` (:func:`register`) with ``sdpa``'s mask builder, so a model
whose ``config._attn_implementation == "parallax"`` calls :func:`parallax_attention_forward` from
every attention module, with transformers' usual arguments ``(module, query, key, value,
attention_mask, dropout, scaling, sliding_window, ...)``.

The probe ``r`` arrives as the keyword ``parallax_r`` (``[B, Hq, Lq, D]``, before the gain): a
module upgraded by :func:`parallax_compile.hf.upgrade.add_probes` has a forward pre-hook that
computes it from the module's input with the module's own per-head norm and rotary embedding
(SPEC section 5: ``r`` goes through the same chain as ``q``, but never through the temperature,
which transformers passes apart as ``scaling``), and the module passes its ``**kwargs`` on to
the attention function. ``r`` is then multiplied per head by ``module.r_gain`` (``[Hq]``). A
module without probes gets ``r = 0``.

Dispatch (``query [B, Hq, Lq, D]`` after the split, ``key / value [B, Hkv, Lk, D]``):

* decode (one new token, ``Lq = 1 < Lk``, no gradient, no mask or a mask that keeps every cached
  key; under ``torch.compile`` / CUDA-graph capture only without a mask, as reading it would sync):
  :func:`parallax_compile.parallax_attention_with_kvcache` with ``cache_seqlens = Lk`` -- the
  split-KV Triton kernel on CUDA;
* everything else (prefill, training, left padding): ``torch.ops.parallax.attention`` with the
  boolean mask transformers built (``True`` = keep) and ``causal=False``; without a mask, the
  module's ``is_causal`` (end-aligned, equal to SDPA's when ``Lq == Lk``) and the sliding window.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..decode import parallax_attention_with_kvcache
from ..op import parallax_attention
from ..probes import apply_gain

__all__ = ["ATTN_IMPLEMENTATION", "CALLS", "parallax_attention_forward", "register"]

ATTN_IMPLEMENTATION = "parallax"

CALLS: dict[int, int] = {}
"""``id(module) -> calls`` while :data:`RECORD` is on (the upgrade checks every probed module ran)."""
RECORD = False
OBSERVERS: list = []
"""Callables ``f(module, q, r, k, v, mask, scale, causal, window, out)`` called after each op call
(``verify`` uses one to compare every call with the float64 reference)."""


def _split_probe(module, query: Tensor, r: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(q, r_gain * r)`` per head; ``r = 0`` for a module without probes."""
    if not getattr(module, "parallax_probe", False):
        return query, torch.zeros_like(query)
    if r is None or r.shape != query.shape:
        got = "nothing" if r is None else f"shape {tuple(r.shape)}"
        raise RuntimeError(f"parallax attention: {type(module).__name__} has a probe but its r reached the attention "
                           f"as {got}, expected {tuple(query.shape)} (the module must pass **kwargs through)")
    return query, apply_gain(r, module.r_gain)


def parallax_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Parallax attention for a transformers attention module; returns ``([B, Lq, Hq, D], None)``
    like ``sdpa_attention_forward``. Raises ``ValueError`` for what Parallax does not have:
    attention dropout in training, logit soft-capping, returned attention weights."""
    if kwargs.get("softcap") is not None:
        raise ValueError("parallax attention: logit soft-capping (`softcap`) is not supported")
    if kwargs.get("output_attentions", False):
        raise ValueError("parallax attention: `output_attentions=True` is not supported (no weights are formed)")
    if dropout and module.training:
        raise ValueError(f"parallax attention: attention dropout ({dropout}) is not supported in training")
    q, r = _split_probe(module, query, kwargs.pop("parallax_r", None))
    if RECORD:
        CALLS[id(module)] = CALLS.get(id(module), 0) + 1
    b, _hq, lq, _ = q.shape
    lk = key.shape[2]
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-1] > lk:
        mask = mask[..., :lk]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    no_grad = not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, r, key, value))
    # The kvcache kernel (end-aligned, every cached key valid) equals what SDPA does only for one new
    # token: with several queries and no mask SDPA's `is_causal` is top-left (a static cache at
    # prefill: the first Lq keys), handled below.
    decode = lq == 1 < lk and no_grad and causal
    # Reading the mask's values is a host sync: not while torch.compile traces or a CUDA graph is
    # captured (then a mask goes to the op below, exact as well).
    no_sync = torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    if decode and (mask is None or (not no_sync and mask.dtype == torch.bool and bool(mask.all()))):
        seqlens = torch.full((b,), lk, dtype=torch.int32, device=q.device)
        out = parallax_attention_with_kvcache(q, r, key, value, cache_seqlens=seqlens, scale=scaling,
                                              window_size=sliding_window, check_values=False)  # lk: in range
        window, causal, mask = sliding_window, True, None
    else:
        window = None
        if mask is None:
            causal = causal and lq > 1
            window = sliding_window if causal else None
            if causal and lk > lq:  # empty static cache at prefill: SDPA's top-left causal == first Lq keys
                key, value = key[:, :, :lq], value[:, :, :lq]
        else:
            causal = False
        out = parallax_attention(q, r, key, value, scale=scaling, causal=causal, window_size=window, attn_mask=mask)
    for f in OBSERVERS:
        f(module, q, r, key, value, mask, scaling, causal, window, out)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"parallax"`` in transformers' ``AttentionInterface`` (with ``sdpa``'s mask
    builder in ``AttentionMaskInterface``). Idempotent; imports transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, parallax_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
