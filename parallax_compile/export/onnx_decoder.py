"""A Hugging Face decoder (upgraded in place by :func:`parallax_compile.hf.upgrade`) as an ONNX
model with a KV cache, in Optimum's layout, and greedy generation with it in ONNX Runtime.

Inputs and outputs (``L`` layers; ``P`` = ``past_sequence_length``, ``S`` = ``sequence_length``)::

    input_ids                  int64 [batch_size, S]
    attention_mask             int64 [batch_size, P + S]      (1 = token, 0 = padding)
    position_ids               int64 [batch_size, S]          (only when the model's forward takes it)
    past_key_values.N.key      float [batch_size, Hkv, P, D]  N = 0 .. L-1 (and .value)
    ->
    logits                     float [batch_size, S, vocab]
    present.N.key              float [batch_size, Hkv, P + S, D]   (and .value)

The first step passes ``P = 0`` (empty past tensors), each later step one new token and the
``present`` tensors of the step before. Only keys and values are cached: the probe ``r`` is
computed from the new tokens' hidden states like ``q`` (SPEC section 5: ``r`` is never cached), and
the probe weights ``r_proj`` (and the per-head gain ``r_gain`` where the model has one) are
parameters of the exported graph. ``position_ids`` are what ``generate()`` uses: the running count
of non-padding tokens, minus one (:func:`position_ids`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

__all__ = ["DecoderWithPast", "cache_names", "export_decoder_onnx", "ort_greedy", "position_ids"]


def _cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); both are accepted."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class DecoderWithPast(torch.nn.Module):
    """``model`` (a transformers causal LM) called with a KV cache given as flat tensors: forward
    ``(input_ids, attention_mask[, position_ids], past_key_values) -> (logits, *present)`` with
    ``past_key_values`` a list of ``(key, value)`` pairs ``[B, Hkv, P, D]`` per layer and
    ``present`` the updated pairs, flattened key, value per layer."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.cache_keyword = _cache_keyword(model)
        self.takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=()):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(past_key_values):
            cache.update(k, v, i)
        kwargs = {"position_ids": position_ids} if self.takes_position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.cache_keyword: cache}, **kwargs)
        present = getattr(out, "cache", None) or out.past_key_values
        return (out.logits, *[t for layer in present.layers for t in (layer.keys, layer.values)])


def _kv_shape(config) -> tuple[int, int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """``(past_key_values.N.key / .value, present.N.key / .value)`` for ``layers`` layers, in order."""
    pairs = [f"{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return [f"past_key_values.{p}" for p in pairs], [f"present.{p}" for p in pairs]


def position_ids(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """What ``generate()`` feeds: ``cumsum(attention_mask) - 1`` (padding positions 1), for the
    last ``new_tokens`` columns. ``attention_mask`` int ``[B, P + S]`` -> int64 ``[B, S]``."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)[:, -new_tokens:]


def export_decoder_onnx(model, path, *, opset: int | None = None, fp16: bool = False,
                        accumulate: str = "float") -> Path:
    """Write ``model`` (a transformers causal LM, eval mode, its attention implementation
    ``parallax``) with its KV cache to ``path`` (module docstring for the inputs and outputs).
    Returns the path. Raises ``ValueError`` for a model whose cache layers are not plain
    key/value tensors (recurrent or hybrid caches)."""
    from .onnx import export_onnx

    layers, kv_heads, head_dim = _kv_shape(model.config)
    wrapper = DecoderWithPast(model).eval()
    b, s, p = 2, 3, 4  # example sizes; every one is symbolic in the file
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[-1, :2] = 0  # left padding: the mask is an input, not folded to "all ones"
    inputs = {"input_ids": torch.randint(0, model.config.get_text_config().vocab_size, (b, s), generator=gen),
              "attention_mask": mask}
    if wrapper.takes_position_ids:
        inputs["position_ids"] = position_ids(mask, s)
    inputs["past_key_values"] = [tuple(torch.randn(b, kv_heads, p, head_dim, generator=gen, dtype=dtype)
                                       for _ in range(2)) for _ in range(layers)]
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else [tuple(t.to(device) for t in kv) for kv in v])
              for k, v in inputs.items()}
    dyn = torch.export.Dim.DYNAMIC
    shapes = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn},
              "past_key_values": [({0: dyn, 2: dyn}, {0: dyn, 2: dyn}) for _ in range(layers)]}
    if wrapper.takes_position_ids:
        shapes["position_ids"] = {0: dyn, 1: dyn}
    past, present = cache_names(layers)
    names = [n for n in ("input_ids", "attention_mask", "position_ids") if n in inputs]
    dims = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    dims["attention_mask"] = {0: "batch_size", 1: "past_sequence_length + sequence_length"}
    dims |= {name: {0: "batch_size", 2: "past_sequence_length"} for name in past}
    with torch.no_grad():
        return export_onnx(wrapper, ((), inputs), path, dynamic_shapes=shapes, opset=opset, fp16=fp16,
                           accumulate=accumulate, input_names=names + past, output_names=["logits"] + present,
                           dim_names=dims)


def ort_greedy(session, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
               *, eos_token_id: int | None = None, pad_token_id: int | None = None,
               step_logits: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation with a KV-cache file in ONNX Runtime (from :func:`export_decoder_onnx`, or
    :func:`parallax_compile.export.graph_decoder.export_graph_decoder_onnx`, whose token input may
    have the model's own name and which takes no ``attention_mask``): one call on the prompt (empty
    past), then one call per new token feeding ``present`` back as ``past_key_values``.
    ``session``: an ``onnxruntime.InferenceSession`` (or a path). Returns
    ``(tokens [B, L + new], first-step logits [B, L, vocab])``; ``step_logits``, when given, gets
    every step's logits appended (``[B, L, vocab]``, then ``[B, 1, vocab]`` per new token). As
    ``generate()``: a row that produced ``eos_token_id`` continues with ``pad_token_id`` (default:
    the eos id), and generation stops when every row has."""
    import numpy as np

    if not hasattr(session, "run"):
        from .ort_kernel import session as make_session

        session = make_session(session, fast_path=False)
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    token_name = next(n for n in inputs if n not in ("attention_mask", "position_ids", *past_names))
    outputs = [o.name for o in session.get_outputs()]
    key = inputs[past_names[0]] if past_names else None
    batch = input_ids.shape[0]
    elem = np.float16 if key is not None and key.type == "tensor(float16)" else np.float32
    past = {n: np.zeros((batch, key.shape[1], 0, key.shape[3]), dtype=elem) for n in past_names}
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    tokens, mask = input_ids.clone(), mask.long().clone()
    step_ids, first, done = tokens, None, torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_new_tokens):
        feed = {token_name: step_ids.numpy(), **past}
        if "attention_mask" in inputs:
            feed["attention_mask"] = mask.numpy()
        if "position_ids" in inputs:
            feed["position_ids"] = position_ids(mask, step_ids.shape[1]).numpy()
        result = dict(zip(outputs, session.run(None, feed)))
        logits = torch.from_numpy(result["logits"]).float()
        first = logits if first is None else first
        if step_logits is not None:
            step_logits.append(logits)
        nxt = logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            pad = eos_token_id if pad_token_id is None else pad_token_id
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done |= nxt == eos_token_id
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        past = {n: result[n.replace("past_key_values.", "present.")] for n in past_names}
        step_ids = nxt[:, None]
        if bool(done.all()):
            break
    return tokens, first
