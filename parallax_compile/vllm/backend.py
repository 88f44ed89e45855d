"""The Parallax attention backend for vLLM: Parallax attention over vLLM's paged KV cache.

A Parallax layer is an ``Attention`` with ``2 * Hq`` query heads built with
``attn_backend=ParallaxAttentionBackend``: per KV head the ``G = Hq / Hkv`` query heads of its group
come first, then the ``G`` probe heads, so vLLM's head -> KV-head mapping (``h // (2G)``) stays
right. Only K and V are cached (``r`` never is, SPEC section 5).

Cache: the per-layer view vLLM hands the backend is ``[num_blocks, Hkv, block_size, 2 * D]``;
this backend writes K to ``[..., :D]`` and V to ``[..., D:]`` itself (:meth:`do_kv_cache_update`,
from ``slot_mapping``), i.e. two paged caches ``[num_blocks, Hkv, block_size, D]`` in the layout
of :func:`parallax_compile.parallax_attention_with_kvcache`.

Per batch (any mix of prefills, chunked-prefill chunks, prefix-cache hits and decodes; query tokens
of request ``b`` are ``query_start_loc[b]:query_start_loc[b+1]`` and sit at the end of its
``seq_lens[b]`` tokens):

* every request with one new token (decode): one batched
  :func:`parallax_compile.parallax_attention_with_kvcache` call with the block table (the split-KV
  Triton kernel on CUDA, the portable path on the CPU);
* every other request: its keys gathered from its blocks and
  :func:`parallax_compile.parallax_attention` with ``causal=True`` (end-aligned when
  ``Lq < Lk``) and the layer's sliding window (the Triton kernel on CUDA, the chunked portable
  kernel on the CPU).

Every index above (which requests decode, their rows, lengths and block table, the other requests'
blocks) is built once per step by :meth:`ParallaxMetadataBuilder.build`, where the step's one host
copy of ``seq_lens`` happens; a layer's forward only gathers its own cache and computes (no host sync).

Refused with one line: ALiBi, logit soft-capping, attention sinks, a quantised KV cache,
encoder / cross attention, KV sharing between layers, fused output quantisation.
CUDA graphs are not supported (the builder says ``NEVER``; vLLM runs these layers eagerly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..decode import parallax_attention_with_kvcache
from ..op import parallax_attention
from . import _compat as c

__all__ = ["BACKEND_NAME", "ParallaxAttentionBackend", "ParallaxAttentionImpl", "ParallaxMetadata",
           "ParallaxMetadataBuilder", "Prefill", "pack_qr", "unpack_output"]

BACKEND_NAME = "PARALLAX"


def pack_qr(q: torch.Tensor, r: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``q``, ``r`` ``[T, Hq * D]`` -> ``[T, 2 * Hq * D]``: per KV head its ``G`` query heads,
    then its ``G`` probe heads."""
    t = q.shape[0]
    qg = q.view(t, num_kv_heads, 1, -1)
    rg = r.view(t, num_kv_heads, 1, -1)
    return torch.cat([qg, rg], dim=2).reshape(t, -1)


def unpack_output(out: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The ``Attention`` output ``[T, 2 * Hq * D]`` -> the query heads' part ``[T, Hq * D]``."""
    t = out.shape[0]
    return out.view(t, num_kv_heads, 2, -1)[:, :, 0].reshape(t, -1)


class Prefill(NamedTuple):
    """One request with more than one new token: its query rows ``start:end``, its length
    ``seq_len`` (counting them) and its ``blocks`` (int64 ``[ceil(seq_len / block_size)]``)."""

    start: int
    end: int
    seq_len: int
    blocks: torch.Tensor


@dataclass
class ParallaxMetadata:
    """What every Parallax layer of one step reads, built once per step by
    :class:`ParallaxMetadataBuilder` (no layer derives indices or syncs with the host)."""

    num_actual_tokens: int
    block_size: int  # of the block table's blocks = the layers' cache blocks
    decode_rows: torch.Tensor  # int64 [Bd]: the token row of each request with one new token
    decode_seq_lens: torch.Tensor  # int32 [Bd], counting the new token
    decode_block_table: torch.Tensor  # int32 [Bd, ceil(max decode_seq_lens / block_size)], contiguous
    prefills: list[Prefill]  # every other request with new tokens


class ParallaxMetadataBuilder(c.AttentionMetadataBuilder[ParallaxMetadata]):
    _cudagraph_support: ClassVar = c.AttentionCGSupport.NEVER
    reorder_batch_threshold = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata,
              fast_build: bool = False) -> ParallaxMetadata:
        """Once per step, for every layer of the group: which requests decode (one new token) and
        their rows, lengths and block table; the other requests' rows, lengths and blocks (the one
        host copy of ``seq_lens`` of the step is here, not in the layers)."""
        m = common_attn_metadata
        b, bs = m.num_reqs, self.kv_cache_spec.block_size
        qsl = m.query_start_loc_cpu[: b + 1].tolist()
        seq_lens = m.seq_lens[:b].to(torch.int32)
        block_table = m.block_table_tensor[:b].to(torch.int32)
        lens = seq_lens.cpu().tolist()
        decode = [i for i in range(b) if qsl[i + 1] - qsl[i] == 1]
        idx = torch.tensor(decode, dtype=torch.int64, device=block_table.device)
        nb = -(-max((lens[i] for i in decode), default=0) // bs)
        prefills = [Prefill(qsl[i], qsl[i + 1], lens[i], block_table[i, : -(-lens[i] // bs)].long())
                    for i in range(b) if qsl[i + 1] - qsl[i] > 1]
        rows = torch.tensor([qsl[i] for i in decode], dtype=torch.int64, device=block_table.device)
        return ParallaxMetadata(num_actual_tokens=m.num_actual_tokens, block_size=bs, decode_rows=rows,
                                decode_seq_lens=seq_lens[idx],
                                decode_block_table=block_table[idx, :nb].contiguous(), prefills=prefills)


class ParallaxAttentionImpl(c.AttentionImpl[ParallaxMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = c.AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **extra) -> None:
        refuse = []
        if alibi_slopes is not None:
            refuse.append("ALiBi")
        if logits_soft_cap:
            refuse.append(f"logit soft-capping ({logits_soft_cap})")
        if extra.get("sinks") is not None:
            refuse.append("attention sinks")
        if kv_cache_dtype != "auto":
            refuse.append(f"a quantised KV cache (kv_cache_dtype={kv_cache_dtype!r}; use 'auto')")
        if attn_type != c.AttentionType.DECODER:
            refuse.append(f"{attn_type} attention (decoder self-attention only)")
        if kv_sharing_target_layer_name is not None:
            refuse.append("KV sharing between layers")
        if refuse:
            raise NotImplementedError(f"parallax vLLM backend: {', '.join(refuse)} not supported")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % (2 * num_kv_heads):
            raise ValueError(f"parallax vLLM backend: num_heads ({num_heads}) must be 2 * Hq with Hq a "
                             f"multiple of num_kv_heads ({num_kv_heads}) ([q; r] packed per KV group)")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads, self.kv_cache_dtype = num_kv_heads, kv_cache_dtype
        self.sliding_window = sliding_window
        self.attn_type = attn_type

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """``query [T, 2 * Hq, D]`` (packed ``[q; r]``), ``key / value [T, Hkv, D]`` (already in
        the cache), ``output [T, 2 * Hq, D]``: the query heads' slots get the Parallax output."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("parallax vLLM backend: fused output quantisation is not supported")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        m: ParallaxMetadata = attn_metadata
        n = m.num_actual_tokens
        hkv, d = self.num_kv_heads, self.head_size
        g = self.num_heads // (2 * hkv)
        qr = query[:n].view(n, hkv, 2, g, d)
        q = qr[:, :, 0].reshape(n, hkv * g, d)
        r = qr[:, :, 1].reshape(n, hkv * g, d)
        k_cache, v_cache = kv_cache[..., :d], kv_cache[..., d:]
        if k_cache.shape[2] != m.block_size:
            raise ValueError(f"parallax vLLM backend: the KV cache has blocks of {k_cache.shape[2]} tokens, "
                             f"the metadata {m.block_size}")
        o = torch.empty_like(q)
        rows = m.decode_rows
        if rows.numel():
            out = parallax_attention_with_kvcache(
                q[rows].unsqueeze(2), r[rows].unsqueeze(2), k_cache, v_cache, cache_seqlens=m.decode_seq_lens,
                block_table=m.decode_block_table, scale=self.scale, window_size=self.sliding_window,
                check_values=False)  # in range by construction (build): no host sync per layer
            o[rows] = out.squeeze(2)
        for s, e, length, blocks in m.prefills:
            k = k_cache[blocks].permute(1, 0, 2, 3).reshape(1, hkv, -1, d)[:, :, :length]
            v = v_cache[blocks].permute(1, 0, 2, 3).reshape(1, hkv, -1, d)[:, :, :length]
            qi = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, Hq, Lq, D]
            ri = r[s:e].transpose(0, 1).unsqueeze(0)
            out = parallax_attention(qi, ri, k, v, scale=self.scale, causal=True,
                                     window_size=self.sliding_window)
            o[s:e] = out[0].transpose(0, 1)
        output[:n].view(n, hkv, 2, g, d)[:, :, 0] = o.view(n, hkv, g, d)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Write ``key / value [T, Hkv, D]`` to the slots ``slot_mapping [T]`` (``-1`` = skip)."""
        d = self.head_size
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        keep = slots >= 0
        slots, key, value = slots[keep], key[:n][keep], value[:n][keep]
        bs = kv_cache.shape[2]
        blk, off = slots // bs, slots % bs
        kv_cache[blk, :, off, :d] = key.to(kv_cache.dtype)
        kv_cache[blk, :, off, d:] = value.to(kv_cache.dtype)


class ParallaxAttentionBackend(c.AttentionBackend):
    """vLLM attention backend ``PARALLAX`` (decoder self-attention, paged KV cache)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return ParallaxAttentionImpl

    @staticmethod
    def get_builder_cls():
        return ParallaxMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [c.MultipleOf(1)]

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == c.AttentionType.DECODER
