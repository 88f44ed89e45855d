"""Decode with a KV cache: ``parallax_attention_with_kvcache`` (SPEC sections 3 and 5).

A few new query tokens per sequence attend to that sequence's cached keys and values; only K
and V are cached, the probe ``r`` is computed for the new tokens alone (SPEC section 5). The query
tokens are the **last** ``Lq`` tokens of each sequence (the cache already holds their K/V), so
causal masking is aligned to the end of each sequence's own length ``cache_seqlens[b]``.

Implementations:

* CUDA (fp16 / bf16 / fp32, head_dim <= 256, triton importable): the split-KV Triton kernel of
  :mod:`parallax_compile.kernels.triton_decode` (one launch over ``(split, KV head, batch)``, then
  the exact merge of SPEC section 3 in a second small launch).
* every other case (the CPU, other dtypes): the portable path below. It gathers the paged cache
  into ``[B, Hkv, L_max, D]``, builds the boolean ``[B, 1, Lq, L_max]`` mask of each sequence's
  end-aligned causal / window pattern and calls the Parallax op
  (``torch.ops.parallax.attention``), whose CPU implementation is
  :mod:`parallax_compile.kernels.chunked` (fp32 inputs accumulate in fp64 there).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

__all__ = ["check_kvcache_args", "decode_mask", "gather_paged", "parallax_attention_with_kvcache"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _err(msg: str) -> str:
    return f"parallax_attention_with_kvcache: {msg}"


def check_kvcache_args(q, r, k_cache, v_cache, cache_seqlens, block_table, scale, window_size,
                       num_splits=None, check_values=True) -> int:
    """Validate every argument before any compute; returns ``L_max`` (the cache capacity per
    sequence). Raises ``TypeError`` / ``ValueError`` naming the argument and the expected shape.
    ``check_values=False`` skips the range checks of ``cache_seqlens`` / ``block_table`` (a host sync)."""
    for name, t in (("q", q), ("r", r), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(_err(f"`{name}` must be a torch.Tensor, got {type(t).__name__}"))
        if t.dim() != 4:
            raise ValueError(_err(f"`{name}` must have 4 dims, got {t.dim()} dims {_shape(t)}"))
        if t.dtype not in _DTYPES:
            raise TypeError(_err(f"`{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}"))
        if t.dtype != q.dtype:
            raise TypeError(_err(f"`{name}` has dtype {t.dtype} but `q` has {q.dtype}; q, r, k_cache, "
                                 "v_cache must share one dtype"))
        if t.device != q.device:
            raise ValueError(_err(f"`{name}` is on {t.device} but `q` is on {q.device}"))
    b, hq, lq, d = q.shape
    if tuple(r.shape) != tuple(q.shape):
        raise ValueError(_err(f"`r` must be shaped like `q` {_shape(q)} [B, Hq, Lq, D], got {_shape(r)}"))
    if lq < 1:
        raise ValueError(_err(f"`q` {_shape(q)} must hold at least one query token (Lq >= 1)"))
    hkv = k_cache.shape[1]
    if k_cache.shape[-1] != d:
        raise ValueError(_err(f"head_dim of `k_cache` {_shape(k_cache)} must equal head_dim {d} of `q`"))
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(_err(f"`v_cache` {_shape(v_cache)} must match `k_cache` {_shape(k_cache)} "
                              "in all but the last dim"))
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(_err(f"num_heads of `q` ({hq}) must be a multiple of num_kv_heads of "
                              f"`k_cache` ({hkv}) (GQA)"))
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32 \
            or tuple(cache_seqlens.shape) != (b,):
        what = _shape(cache_seqlens) + f" {cache_seqlens.dtype}" if isinstance(cache_seqlens, Tensor) \
            else type(cache_seqlens).__name__
        raise TypeError(_err(f"`cache_seqlens` must be an int32 tensor [B] = [{b}], got {what}"))
    if cache_seqlens.device != q.device:
        raise ValueError(_err(f"`cache_seqlens` is on {cache_seqlens.device} but `q` is on {q.device}"))
    if block_table is None:
        if k_cache.shape[0] != b:
            raise ValueError(_err(f"`k_cache` {_shape(k_cache)} must be [B, Hkv, L_max, D] with B = {b} "
                                  "(or pass `block_table` for a paged cache)"))
        l_max = k_cache.shape[2]
    else:
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
                or block_table.shape[0] != b:
            what = _shape(block_table) + f" {block_table.dtype}" if isinstance(block_table, Tensor) \
                else type(block_table).__name__
            raise TypeError(_err(f"`block_table` must be an int32 tensor [B, max_blocks] with B = {b}, got {what}"))
        if block_table.device != q.device:
            raise ValueError(_err(f"`block_table` is on {block_table.device} but `q` is on {q.device}"))
        l_max = block_table.shape[1] * k_cache.shape[2]
    if window_size is not None and (not isinstance(window_size, int) or window_size < 1):
        raise ValueError(_err(f"`window_size` must be a positive number of keys or None, got {window_size!r}"))
    if scale is not None and not math.isfinite(scale):
        raise ValueError(_err(f"`scale` must be finite, got {scale}"))
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(_err(f"`num_splits` must be a positive int or None (heuristic), got {num_splits!r}"))
    capturing = (q.is_cuda and torch.cuda.is_current_stream_capturing()) or torch.compiler.is_compiling()
    if check_values and not capturing and b > 0:  # a host sync: skipped in CUDA-graph capture and compile
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > l_max:
            raise ValueError(_err(f"`cache_seqlens` must lie in [0, L_max = {l_max}], got min {lo}, max {hi}"))
        if block_table is not None and block_table.numel():
            bmin, bmax = int(block_table.min()), int(block_table.max())
            if bmin < 0 or bmax >= k_cache.shape[0]:
                raise ValueError(_err(f"`block_table` entries must lie in [0, num_blocks = {k_cache.shape[0]}), "
                                      f"got min {bmin}, max {bmax}"))
    return l_max


def gather_paged(cache: Tensor, block_table: Tensor) -> Tensor:
    """Paged ``[num_blocks, Hkv, block_size, D]`` + ``block_table [B, max_blocks]`` ->
    contiguous ``[B, Hkv, max_blocks * block_size, D]`` (sequence ``b``'s key ``j`` lives in block
    ``block_table[b, j // block_size]`` at row ``j % block_size``)."""
    b, nb = block_table.shape
    _, hkv, bs, d = cache.shape
    pages = cache[block_table.long()]  # [B, max_blocks, Hkv, block_size, D]
    return pages.permute(0, 2, 1, 3, 4).reshape(b, hkv, nb * bs, d)


def decode_mask(cache_seqlens: Tensor, lq: int, l_max: int, window_size: int | None) -> Tensor:
    """Boolean ``[B, 1, Lq, L_max]`` (True = keep): query row ``i`` of sequence ``b`` sits at
    position ``p = cache_seqlens[b] - Lq + i`` and sees keys ``j <= p`` (and ``j > p - W`` with a
    window ``W``): causal aligned to the end of each sequence (SPEC section 5)."""
    pos = cache_seqlens.long()[:, None, None] - lq + torch.arange(lq, device=cache_seqlens.device)[None, :, None]
    j = torch.arange(l_max, device=cache_seqlens.device)[None, None, :]
    keep = j <= pos
    if window_size is not None:
        keep = keep & (j > pos - window_size)
    return keep[:, None]


def _portable(q, r, k_cache, v_cache, cache_seqlens, block_table, scale, window_size, l_max):
    if block_table is not None:
        k_cache, v_cache = gather_paged(k_cache, block_table), gather_paged(v_cache, block_table)
    mask = decode_mask(cache_seqlens, q.shape[2], l_max, window_size)
    # Slots past a sequence's length are never read: zeroed, so that whatever an uninitialised cache
    # holds there (NaN, Inf) cannot reach the output through 0 * NaN.
    used = (torch.arange(l_max, device=q.device)[None, :] < cache_seqlens.long()[:, None])[:, None, :, None]
    k_cache, v_cache = torch.where(used, k_cache, 0), torch.where(used, v_cache, 0)
    return torch.ops.parallax.attention(q, r, k_cache, v_cache, mask, scale, False, None)[0]


@functools.cache
def _triton_decode():
    """The Triton decode kernels, imported lazily; None when triton is missing or broken."""
    try:
        from .kernels import triton_decode
    except ImportError:
        return None  # no triton: the portable path, as documented
    except Exception as e:  # noqa: BLE001 - a broken install: say so once, then the portable path
        warnings.warn(f"parallax_attention_with_kvcache: the Triton decode kernel could not be imported "
                      f"({type(e).__name__}: {e}); using the portable path (slower on CUDA)", RuntimeWarning,
                      stacklevel=3)
        return None
    return triton_decode


def parallax_attention_with_kvcache(
    q: Tensor,
    r: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    *,
    cache_seqlens: Tensor,
    block_table: Tensor | None = None,
    scale: float | None = None,
    window_size: int | None = None,
    num_splits: int | None = None,
    check_values: bool = True,
) -> Tensor:
    """Parallax attention of the last ``Lq`` tokens of each sequence against its KV cache
    (decode; paper arXiv 2605.29157, SPEC sections 2, 3 and 5). ``r`` is never cached.

    ``o_i = mu_v_i - C_vk,i r_i`` over the keys ``J(i)`` of row ``i`` (see ``window_size``);
    ``r = 0`` gives softmax attention exactly.

    Args:
        q: queries ``[B, Hq, Lq, D]`` (``Lq`` = 1 for one decode step, a few for speculative
            decoding), float16 / bfloat16 / float32 (float64 on the portable path).
        r: probes ``[B, Hq, Lq, D]``, same dtype; **not** multiplied by ``scale``.
        k_cache: keys. Contiguous cache ``[B, Hkv, L_max, D]`` (the op's ``[B, H, L, D]`` layout),
            or, with ``block_table``, a paged cache ``[num_blocks, Hkv, block_size, D]`` (each
            block is a small ``[Hkv, L, D]`` cache; note FlashAttention's ``flash_attn_with_kvcache``
            puts ``block_size`` before ``Hkv`` instead: ``k_cache.transpose(1, 2)`` of such a cache
            is accepted as is, strides are honoured). ``Hq % Hkv == 0``; query head ``h`` reads KV
            head ``h // (Hq // Hkv)`` (GQA/MQA).
        v_cache: values, laid out like ``k_cache`` with head dim ``Dv``.
        cache_seqlens: int32 ``[B]``: tokens in sequence ``b``'s cache, **including** the ``Lq``
            new ones (their K/V must already be written). Row ``i`` sits at position
            ``p = cache_seqlens[b] - Lq + i`` and sees keys ``j <= p``::

                cache_seqlens = [5, 3], Lq = 2:   b=0: 1 1 1 1 0 . .   b=1: 1 1 0 . . . .
                                                       1 1 1 1 1 . .        1 1 1 . . . .
            Must lie in ``[0, L_max]``; a row with ``p < 0`` sees no key and gives 0.
        block_table: int32 ``[B, max_blocks]`` or None: key ``j`` of sequence ``b`` is row
            ``j % block_size`` of block ``block_table[b, j // block_size]`` (vLLM / FlashAttention
            paging); ``L_max = max_blocks * block_size``.
        scale: softmax temperature on ``q . k``; default ``D ** -0.5``.
        window_size: sliding window ``W``: row ``i`` sees keys ``p - W < j <= p`` (Hugging Face's
            ``sliding_window``, Mistral / Gemma 3); None = no window.
        num_splits: key splits per (sequence, KV head) for the CUDA kernel (split-KV; the
            partial statistics ``(m, d1, d2, O1, O2)`` are merged exactly, SPEC section 3);
            None picks it from the grid size and ``L_max``. Ignored by the portable path.
        check_values: False skips the range checks of ``cache_seqlens`` and ``block_table`` (see
            Raises) and their host sync, for a caller whose values are in range by construction
            (the vLLM backend: its block table is sized from the lengths once per step, the block
            ids are vLLM's own).

    Returns:
        ``[B, Hq, Lq, Dv]`` in ``q``'s dtype (statistics and accumulators fp32; fp64 for fp32
        inputs on the CPU). Nothing else: the decode step needs no backward statistics.

    Raises:
        TypeError / ValueError: wrong rank or dtype, mismatched head_dim / batch / layout,
        ``Hq % Hkv != 0``, ``cache_seqlens`` not int32 ``[B]`` or outside ``[0, L_max]``, block
        ids out of range, a non-positive window; raised before any kernel launches. (The range
        checks of ``cache_seqlens`` / ``block_table`` need a host sync and are skipped while a
        CUDA graph is being captured or ``torch.compile`` traces the call.)
    """
    l_max = check_kvcache_args(q, r, k_cache, v_cache, cache_seqlens, block_table, scale, window_size, num_splits,
                               check_values)
    s = (q.shape[-1] ** -0.5 if q.shape[-1] else 1.0) if scale is None else float(scale)
    if q.is_cuda:
        td = _triton_decode()
        if td is not None and td.supports(q, k_cache, v_cache):
            return td.parallax_decode(q, r, k_cache, v_cache, cache_seqlens, block_table, s, window_size,
                                      num_splits=num_splits)
    return _portable(q, r, k_cache, v_cache, cache_seqlens, block_table, s, window_size, l_max)
