"""The Parallax attention op: one ``torch.library.custom_op`` that eager mode, autograd,
``torch.compile``, ``torch.export``, the graph passes and the ONNX exporter all see as one node.

* ``torch.ops.parallax.attention(q, r, k, v, attn_mask, scale, causal, window_size)`` returns
  ``(out, mu_v, lse, c)``; only ``out`` is differentiable, the rest are the statistics the
  backward needs (SPEC section 4). Use :func:`parallax_attention` for the output alone.
* ``torch.ops.parallax.attention_backward`` is the backward of SPEC section 4 as its own op.

Implementations: :mod:`parallax_compile.kernels.chunked` for every device (bounded memory);
on CUDA the fused Triton kernels (:mod:`parallax_compile.kernels.triton_parallax`) for the cases
they cover (fp16/bf16, no mask or a key-padding mask, any length, GQA, causal, window), the
chunked path for the rest.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .kernels import chunked

__all__ = ["parallax_attention", "check_attention_args"]


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_attention_args(
    q: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    window_size: int | None = None,
) -> None:
    """Validate the op's arguments before any compute; raise ``ValueError``/``TypeError`` naming
    the argument and the expected shape or dtype."""
    for name, t in (("q", q), ("r", r), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"parallax_attention: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"parallax_attention: `{name}` must have 4 dims [B, H, L, D], got {t.dim()} dims {_shape(t)}"
            )
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(
                f"parallax_attention: `{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"parallax_attention: `{name}` has dtype {t.dtype} but `q` has {q.dtype}; all of q, r, k, v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"parallax_attention: `{name}` is on {t.device} but `q` is on {q.device}; all inputs must be on one device")
    b, hq, lq, d = q.shape
    if tuple(r.shape) != tuple(q.shape):
        raise ValueError(f"parallax_attention: `r` must be shaped like `q` {_shape(q)} [B, Hq, Lq, D], got {_shape(r)}")
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"parallax_attention: batch of `k` {_shape(k)} / `v` {_shape(v)} must equal batch {b} of `q` {_shape(q)}")
    if k.shape[-1] != d:
        raise ValueError(f"parallax_attention: head_dim of `k` {_shape(k)} must equal head_dim {d} of `q` {_shape(q)}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"parallax_attention: `v` {_shape(v)} must be [B, Hkv, Lk, Dv] with Hkv, Lk of `k` {_shape(k)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"parallax_attention: num_heads of `q` ({hq}) must be a multiple of num_kv_heads of `k` ({hkv}) (GQA)"
        )
    if window_size is not None and window_size < 1:
        raise ValueError(f"parallax_attention: `window_size` must be a positive number of keys, got {window_size}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"parallax_attention: `scale` must be finite, got {scale}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"parallax_attention: `attn_mask` must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(
                f"parallax_attention: `attn_mask` must be bool (True = keep) or floating (additive), got {attn_mask.dtype}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"parallax_attention: `attn_mask` is on {attn_mask.device} but `q` is on {q.device}")
        target = (b, hq, lq, k.shape[2])
        ok = attn_mask.dim() <= 4 and all(
            m == 1 or m == t for m, t in zip(reversed(attn_mask.shape), reversed(target))
        )
        if not ok:
            raise ValueError(
                f"parallax_attention: `attn_mask` {_shape(attn_mask)} is not broadcastable to "
                f"[B, Hq, Lq, Lk] = [{', '.join(map(str, target))}]"
            )


def _resolve_scale(q: Tensor, scale: float | None) -> float:
    if scale is not None:
        return scale
    return q.shape[-1] ** -0.5 if q.shape[-1] else 1.0  # head_dim 0: every logit is 0 anyway


@torch.library.custom_op("parallax::attention", mutates_args=())
def _attention(
    q: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_attention_args(q, r, k, v, attn_mask, scale, window_size)
    return chunked.parallax_fwd(q, r, k, v, attn_mask, _resolve_scale(q, scale), causal, window_size)


@_attention.register_fake
def _attention_fake(q, r, k, v, attn_mask=None, scale=None, causal=False, window_size=None):
    check_attention_args(q, r, k, v, attn_mask, scale, window_size)
    b, hq, lq, _ = q.shape
    out = q.new_empty(b, hq, lq, v.shape[-1])
    stats = q.new_empty(b, hq, lq, dtype=chunked.stats_dtype(q.dtype))
    return out, torch.empty_like(out), stats, torch.empty_like(stats)


@torch.library.custom_op("parallax::attention_backward", mutates_args=())
def _attention_backward(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dr, dk, dv, d_mask = chunked.parallax_bwd(
        grad_out.contiguous(), q, r, k, v, out, mu_v, lse, c, attn_mask,
        _resolve_scale(q, scale), causal, window_size, mask_needs_grad,
    )
    return dq, dr, dk, dv, (d_mask if d_mask is not None else q.new_empty(0))


@_attention_backward.register_fake
def _attention_backward_fake(grad_out, q, r, k, v, out, mu_v, lse, c, attn_mask, scale, causal, window_size, mask_needs_grad):
    # Contiguous, like the real implementations (empty_like would copy a transposed input's strides).
    d_mask = attn_mask.new_empty(attn_mask.shape) if mask_needs_grad else q.new_empty(0)
    return q.new_empty(q.shape), r.new_empty(r.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_mask


@functools.cache
def _triton_kernels():
    """The Triton kernels, imported lazily (``import parallax_compile`` never imports triton);
    None when triton is missing or broken, and then the portable path serves CUDA too."""
    try:
        from .kernels import triton_parallax
    except Exception:  # noqa: BLE001
        return None
    return triton_parallax


@_attention.register_kernel("cuda")
def _attention_cuda(q, r, k, v, attn_mask=None, scale=None, causal=False, window_size=None):
    check_attention_args(q, r, k, v, attn_mask, scale, window_size)
    s = _resolve_scale(q, scale)
    tp = _triton_kernels()
    if tp is not None and tp.supports(q, r, k, v, attn_mask, s, causal, window_size):
        return tp.parallax_fwd(q, r, k, v, attn_mask, s, causal, window_size)
    return chunked.parallax_fwd(q, r, k, v, attn_mask, s, causal, window_size)


@_attention_backward.register_kernel("cuda")
def _attention_backward_cuda(grad_out, q, r, k, v, out, mu_v, lse, c, attn_mask, scale, causal,
                             window_size, mask_needs_grad):
    s = _resolve_scale(q, scale)
    tp = _triton_kernels() if q.shape[2] and k.shape[2] else None  # empty: the portable path's zeros
    if tp is not None and tp.supports(q, r, k, v, attn_mask, s, causal, window_size, mask_needs_grad):
        dq, dr, dk, dv, _ = tp.parallax_bwd(grad_out, q, r, k, v, out, mu_v, lse, c, attn_mask, s,
                                            causal, window_size, False)
        return dq, dr, dk, dv, q.new_empty(0)
    dq, dr, dk, dv, d_mask = chunked.parallax_bwd(grad_out.contiguous(), q, r, k, v, out, mu_v, lse, c,
                                                  attn_mask, s, causal, window_size, mask_needs_grad)
    return dq, dr, dk, dv, (d_mask if d_mask is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, r, k, v, attn_mask, scale, causal, window_size = inputs
    out, mu_v, lse, c = output
    ctx.mark_non_differentiable(mu_v, lse, c)
    ctx.save_for_backward(q, r, k, v, out, mu_v, lse, c, attn_mask)
    ctx.scale, ctx.causal, ctx.window_size = scale, causal, window_size
    ctx.mask_needs_grad = attn_mask is not None and attn_mask.requires_grad


def _backward(ctx, grad_out, _grad_mu_v, _grad_lse, _grad_c):
    q, r, k, v, out, mu_v, lse, c, attn_mask = ctx.saved_tensors
    dq, dr, dk, dv, d_mask = torch.ops.parallax.attention_backward(
        grad_out, q, r, k, v, out, mu_v, lse, c, attn_mask,
        ctx.scale, ctx.causal, ctx.window_size, ctx.mask_needs_grad,
    )
    return dq, dr, dk, dv, (d_mask if ctx.mask_needs_grad else None), None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


# Autocast: like `scaled_dot_product_attention`, the op runs in the autocast dtype. Under
# `torch.autocast(device)`, float32 q, r, k, v are cast to `torch.get_autocast_dtype(device)` (float64
# is left alone, as autocast does); `attn_mask` keeps its dtype. `torch.library.register_autocast`
# takes one fixed dtype, hence this kernel, which reads the dtype of the active autocast region.
_AUTOCAST_LIB = torch.library.Library("parallax", "IMPL")


def _register_autocast(device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

    def kernel(_keyset, q, r, k, v, *args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        q, r, k, v = (t.to(dtype) if t.dtype == torch.float32 else t for t in (q, r, k, v))
        with torch._C._ExcludeDispatchKeyGuard(key):
            return torch.ops.parallax.attention.default(q, r, k, v, *args, **kwargs)

    _AUTOCAST_LIB.impl("attention", kernel, key_name, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)


def parallax_attention(
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
    """Parallax attention (paper arXiv 2605.29157; SPEC sections 2-4).

    ``o_i = mu_v_i - C_vk,i r_i`` with softmax weights ``s_ij`` of the logits
    ``l_ij = scale * q_i . k_j (+ attn_mask)``, ``mu_v_i = sum_j s_ij v_j`` and
    ``C_vk,i = sum_j s_ij (v_j - mu_v_i)(k_j - mu_k_i)^T``. With ``r = 0`` this is exactly
    softmax attention (``scaled_dot_product_attention``).

    Args:
        q: queries ``[B, Hq, Lq, D]``, float16 / bfloat16 / float32 (float64 on the portable path).
        r: probes ``[B, Hq, Lq, D]``, same dtype; **not** multiplied by ``scale``.
        k: keys ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA: query head ``h`` reads KV
            head ``h // (Hq // Hkv)``).
        v: values ``[B, Hkv, Lk, Dv]``.
        scale: softmax temperature on ``q . k``; default ``D ** -0.5``.
        causal: query row ``i`` sees keys ``j <= i + Lk - Lq`` (aligned to the **end** of the
            keys, as FlashAttention with a KV cache; PyTorch SDPA's ``is_causal`` aligns to the
            top-left instead)::

                Lq=2, Lk=5:   1 1 1 1 0
                              1 1 1 1 1
        window_size: sliding window ``W`` in keys: keys ``j > i' - W`` with ``i' = i + Lk - Lq``
            (and ``j < i' + W`` when not causal).
        attn_mask: boolean (True = keep) or additive float mask broadcastable to
            ``[B, Hq, Lq, Lk]``, added to the scaled logits. A learned additive mask (a position
            bias) receives its gradient.

    Returns:
        ``[B, Hq, Lq, Dv]`` in ``q``'s dtype; statistics are accumulated in fp32. A row with no
        allowed key gives 0 (not NaN). NaN/Inf in the inputs propagate as in SDPA.

    Raises:
        ValueError / TypeError: wrong rank, mismatched head_dim or batch, ``Hq % Hkv != 0``,
        mixed dtypes or devices, a mask that does not broadcast, a non-positive window; raised
        before any compute, naming the argument and the expected shape.
    """
    return torch.ops.parallax.attention(q, r, k, v, attn_mask, scale, causal, window_size)[0]
