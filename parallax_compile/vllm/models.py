"""Parallax versions of vLLM's Llama, Mistral, Qwen3 and Gemma 3 causal LMs.

Each class is vLLM's own model class; after it is built, every attention module named in
``config.parallax_probes`` (``{owner path: [Hq * D, hidden]}``, the probe's shape, written by
:func:`parallax_compile.hf.upgrade`; ``{owner path: "q_proj"}`` in directories written before)
becomes a Parallax attention module (:func:`install_probes`):

* ``r_proj`` -- the probe ``W_R``, a ``ColumnParallelLinear(hidden, Hq * D)`` sharded like
  ``q_proj`` (by query heads); checkpoint name ``<owner>.r_proj.weight``;
* ``r_gain`` -- ``[Hq]`` per-head gains (sharded by heads), checkpoint name ``<owner>.r_gain``; a
  checkpoint without it (written before the gain existed) gets gain 1, which is what such a model
  computed;
* forward: ``r = r_gain[h] * chain(W_R x)[h]`` where the chain is the module's own query chain
  (per-head ``q_norm`` for Qwen3 / Gemma 3, then the rotary embedding; never the temperature), then
  ``[q; r]`` packed per KV group into an ``Attention`` with ``2 * Hq`` heads and the Parallax
  backend (:mod:`parallax_compile.vllm.backend`).

Sliding windows: the layer's window as vLLM's model sets it (Gemma 3's ``layer_types``); Mistral
without ``layer_types`` applies ``config.sliding_window`` on every layer, as transformers does.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from . import _compat as c
from .backend import ParallaxAttentionBackend, pack_qr, unpack_output

__all__ = [
    "ParallaxGemma3ForCausalLM",
    "ParallaxLlamaForCausalLM",
    "ParallaxMistralForCausalLM",
    "ParallaxQwen3ForCausalLM",
    "install_probes",
]

logger = c.init_logger("vllm.parallax_compile")


def _per_head(norm: nn.Module, x: torch.Tensor, d: int) -> torch.Tensor:
    return norm(x.unflatten(-1, (-1, d))).flatten(-2)


def parallax_attention_forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                               **kwargs) -> torch.Tensor:
    """Forward of a Parallax attention module (bound to the stock module by :func:`install_probes`)."""
    qkv, _ = self.qkv_proj(hidden_states)
    q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
    r, _ = self.r_proj(hidden_states)
    d = self.head_dim
    qr = torch.cat([q, r], dim=-1)  # [T, 2 * Hq * D]: q and r share the whole query chain
    if getattr(self, "q_norm", None) is not None:
        qr = _per_head(self.q_norm, qr, d)
        k = _per_head(self.k_norm, k, d)
    qr, k = self.rotary_emb(positions, qr, k)
    q, r = qr.split([self.q_size, self.q_size], dim=-1)
    r = (r.unflatten(-1, (-1, d)) * self.r_gain.to(r.dtype)[:, None]).flatten(-2)
    out = self.attn(pack_qr(q, r, self.num_kv_heads), k, v)
    output, _ = self.o_proj(unpack_output(out, self.num_kv_heads))
    return output


def _load_sharded_heads(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """``r_gain [Hq]`` -> this rank's heads (a one-element gain scales every head)."""
    n = param.shape[0]
    if loaded.numel() == 1:
        param.data.fill_(float(loaded.reshape(())))
        return
    start = c.get_tensor_model_parallel_rank() * n
    param.data.copy_(loaded.narrow(0, start, n).to(param.dtype))


def _q_proj_like(value) -> bool:
    """A ``parallax_probes`` value this plugin serves: ``"q_proj"`` or the probe shape
    ``[Hq * D, hidden]`` (the probe replays the query chain of ``q_proj``, the query part of vLLM's ``qkv_proj``)."""
    if isinstance(value, str):
        return value == "q_proj"
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(n, int) for n in value)


def _convert(module: nn.Module, owner: str, vllm_config, window: int | None, shape=None) -> None:
    for attr in ("qkv_proj", "o_proj", "rotary_emb", "attn", "scaling", "q_size", "kv_size"):
        if not hasattr(module, attr):
            raise TypeError(f"parallax vLLM plugin: `{owner}` ({type(module).__name__}) has no `{attr}`; "
                            f"written for vLLM {c.VLLM_VERSION}, running {c.installed_version()}")
    old = module.attn
    if getattr(module, "do_llama_4_scaling", False):
        raise NotImplementedError(f"parallax vLLM plugin: `{owner}` uses Llama 4 attention scaling, "
                                  "not supported")
    if getattr(old.impl, "logits_soft_cap", None):
        raise NotImplementedError(f"parallax vLLM plugin: `{owner}` uses logit soft-capping, not supported")
    hq, hkv, d = module.num_heads, module.num_kv_heads, module.head_dim
    tp = c.get_tensor_model_parallel_world_size()
    if shape is not None and list(shape) != [hq * tp * d, module.qkv_proj.input_size]:
        raise ValueError(f"parallax vLLM plugin: `{owner}` has a probe of shape {list(shape)} in parallax_probes, "
                         f"expected [Hq * D, hidden] = {[hq * tp * d, module.qkv_proj.input_size]}")
    module.r_proj = c.ColumnParallelLinear(module.qkv_proj.input_size, hq * tp * d, bias=False,
                                           quant_config=None, prefix=f"{owner}.r_proj")
    module.r_gain = nn.Parameter(torch.ones(hq, dtype=module.r_proj.weight.dtype), requires_grad=False)
    module.r_gain.weight_loader = _load_sharded_heads
    c.forget_attention_layer(vllm_config, old.layer_name)
    module.attn = c.Attention(2 * hq, d, module.scaling, num_kv_heads=hkv,
                              cache_config=vllm_config.cache_config, quant_config=None,
                              per_layer_sliding_window=window, prefix=old.layer_name,
                              attn_backend=ParallaxAttentionBackend)
    module.forward = types.MethodType(parallax_attention_forward, module)


def install_probes(model: nn.Module, vllm_config, *, all_layers_window: int | None = None) -> list[str]:
    """Turn every owner of ``config.parallax_probes`` in ``model`` into a Parallax attention module;
    returns the converted owners. ``all_layers_window``: a window for every layer (Mistral).
    Raises ``ValueError`` (one line) for a config without probes, with a projection other than
    ``q_proj`` or a probe shape other than ``[Hq * D, hidden]``, ``NotImplementedError`` for what
    the plugin does not support."""
    config = vllm_config.model_config.hf_config
    probes = getattr(config, "parallax_probes", None)
    if not probes:
        raise ValueError(f"parallax vLLM plugin: {config.architectures} config has no `parallax_probes`; "
                         "serve a directory written by parallax-compile (hf.upgrade + save_pretrained)")
    if vllm_config.speculative_config is not None:
        raise NotImplementedError("parallax vLLM plugin: speculative decoding is not supported")
    bad = {o: p for o, p in probes.items() if not _q_proj_like(p)}
    if bad:
        raise ValueError(f"parallax vLLM plugin: probes on projections other than `q_proj` are not "
                         f"supported: {bad}")
    modules = dict(model.named_modules())
    done = []
    for owner in probes:
        module = modules.get(owner)
        if module is None:  # a layer of another pipeline stage
            continue
        window = module.attn.sliding_window if all_layers_window is None else all_layers_window
        _convert(module, owner, vllm_config, window, None if isinstance(probes[owner], str) else probes[owner])
        done.append(owner)
    if not done and not any(o.startswith("model.layers.") for o in probes):
        raise ValueError(f"parallax vLLM plugin: no module of parallax_probes {sorted(probes)} in the model")
    logger.info("parallax: %d attention modules use Parallax attention (backend %s)", len(done),
                ParallaxAttentionBackend.get_name())
    return done


def _with_default_gains(model: nn.Module, loaded: set[str]) -> set[str]:
    """A checkpoint without any ``r_gain`` (saved before the gain existed) keeps gain 1, what it
    computed (as :func:`parallax_compile.hf.from_pretrained`); one with some gains missing is refused."""
    gains = {n for n, _ in model.named_parameters() if n.endswith(".r_gain")}
    missing = gains - loaded
    if missing and missing != gains:
        raise ValueError(f"parallax vLLM plugin: probe gains missing from the checkpoint: {sorted(missing)}")
    if missing:
        logger.info("parallax: %d r_gain tensors not in the checkpoint; gain 1 (r = chain(W_R x))",
                    len(missing))
    return loaded | missing


class _ParallaxMixin:
    _all_layers_window = False
    # vLLM's loader reads every *.safetensors in the directory; `parallax-compile convert` also writes
    # reference.safetensors (example inputs and outputs, not weights). Read vLLM attribute: _compat.
    allow_patterns_overrides: ClassVar[list[str]] = ["model*.safetensors"]

    def _install(self, vllm_config) -> None:
        window = None
        if self._all_layers_window:
            cfg = vllm_config.model_config.hf_config
            if not getattr(cfg, "layer_types", None):
                window = getattr(cfg, "sliding_window", None)
        install_probes(self, vllm_config, all_layers_window=window)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return _with_default_gains(self, super().load_weights(weights))


class ParallaxLlamaForCausalLM(_ParallaxMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._install(vllm_config)


class ParallaxMistralForCausalLM(_ParallaxMixin, MistralForCausalLM):
    _all_layers_window = True

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._install(vllm_config)


class ParallaxQwen3ForCausalLM(_ParallaxMixin, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._install(vllm_config)


class ParallaxGemma3ForCausalLM(_ParallaxMixin, Gemma3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._install(vllm_config)
