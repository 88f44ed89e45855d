"""Capture: ``torch.export`` a model into a rewritable ATen graph (training IR, no decompositions).

``scaled_dot_product_attention`` stays one node, hand-written attention is a short
matmul/scale/mask/softmax/matmul chain, and every node carries ``nn_module_stack`` (the owning
module path) and ``val`` (a fake tensor with shapes). Batch and sequence dims are exported as
dynamic (``Dim.AUTO``) where the model allows it; a model that specialises them (for example
``is_causal=L > 1`` on a dynamic ``L``) falls back to static shapes and the report says so.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree


@dataclass
class Capture:
    """A captured model: the unlifted ``GraphModule`` and the example inputs it was traced with."""

    gm: fx.GraphModule
    args: tuple
    kwargs: dict[str, Any]
    dynamic: bool
    note: str = ""
    dynamic_shapes: Any = field(default=None, repr=False)

    def run(self, gm: fx.GraphModule | None = None):
        return (gm or self.gm)(*self.args, **self.kwargs)

    def flat_inputs(self) -> list:
        return pytree.tree_leaves((self.args, self.kwargs))


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a Tensor, a tuple of positional inputs, a dict of keyword inputs, "
        f"or (args, kwargs); got {type(example_inputs).__name__}"
    )


def _dynamic_shapes(model, args, kwargs, dynamic_dims):
    """``Dim.AUTO`` for the named dims (default: dims 0 and 1 of every tensor input of rank >= 2),
    keyed by the names of ``model.forward``'s parameters."""

    def spec(name, value):
        if not isinstance(value, torch.Tensor):
            return None
        dims = dynamic_dims.get(name) if dynamic_dims is not None else None
        if dims is None:
            dims = range(min(2, value.dim())) if dynamic_dims is None and value.dim() >= 2 else ()
        return {int(d): torch.export.Dim.AUTO for d in dims} or None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    shapes = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(k, v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(j, v) for j, v in enumerate(value))
        else:
            shapes[name] = spec(name if name in kwargs else i, value)
    return shapes


def _fresh(args, kwargs):
    """New tensor objects over the same data: export marks the tensors it traces as dynamic, and
    those marks would leak into the next attempt."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), (args, kwargs))


def _strip_asserts(gm: fx.GraphModule) -> None:
    """Drop ``_assert_tensor_metadata`` nodes: they pin tensors a rewrite makes dead."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()


def unlift(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """``ep.module()`` without the guard node, and with ``nn.Module``'s ``train()``/``eval()`` back.

    The graph is the one captured in eval mode either way (dropout stays inactive); the flag only
    matters to code that reads ``module.training``.
    """
    gm = ep.module(check_guards=False)
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    return gm


CACHE_NOTE = "use_cache disabled for the capture (the converted module returns no KV cache)"


@contextlib.contextmanager
def cache_disabled(model, kwargs: dict):
    """Capture a Hugging Face model without its KV cache: a ``DynamicCache`` output is not a tensor
    tree ``torch.export`` can trace. Yields the note for the report (or ``""``): when the model's
    ``forward`` takes ``use_cache`` and the call leaves it out, the config's ``use_cache`` is off
    while the block runs (restored afterwards). Raises ``ValueError`` for an explicit
    ``use_cache=True`` (the converted module would have to return a cache it cannot build)."""
    config = getattr(model, "config", None)
    takes = "use_cache" in inspect.signature(model.forward).parameters
    if kwargs.get("use_cache") is True:
        raise ValueError("example_inputs: use_cache=True asks for a KV cache object, which the graph converter "
                         "cannot capture; pass use_cache=False or leave it out")
    if config is None or not takes or "use_cache" in kwargs or not getattr(config, "use_cache", False):
        yield ""
        return
    was = config.use_cache
    config.use_cache = False
    try:
        yield CACHE_NOTE
    finally:
        config.use_cache = was


def _export_error(exc: Exception) -> str:
    """The first line of an export error, with torch.export's pytree advice replaced by what the
    user can do about an output object it cannot trace."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "register a pytree" in text or "which is not a known type" in first:
        kind = first.split("<class '")[-1].split("'>")[0].rsplit(".", 1)[-1] if "<class '" in first else "object"
        return (f"the model returns a `{kind}`, which is not a tensor, tuple, list or dict; return tensors "
                "(a Hugging Face model: pass use_cache=False)")
    return first


def capture(model: torch.nn.Module, example_inputs, *, dynamic_dims=None, dynamic: bool = True) -> Capture:
    """Export ``model`` on ``example_inputs`` and return the unlifted, guard-free graph.

    ``example_inputs``: a Tensor, a tuple of positional inputs, a dict of keyword inputs or
    ``(args, kwargs)``. ``dynamic_dims``: ``{input name or position: {dim: label}}``; default
    marks dims 0 and 1 (batch, sequence) of every tensor input dynamic.
    A Hugging Face model that would return a KV cache is captured with ``use_cache=False``
    (:func:`cache_disabled`; the report's note says so).
    Raises ``RuntimeError`` naming the export error when the model cannot be exported at all.
    """
    args, kwargs = _split_inputs(example_inputs)
    with cache_disabled(model, kwargs) as cache_note:
        cap = _capture(model, args, kwargs, dynamic_dims, dynamic)
    if cache_note:
        cap.note = "; ".join(n for n in (cache_note, cap.note) if n)
    return cap


def _capture(model, args, kwargs, dynamic_dims, dynamic) -> Capture:
    was_training = model.training
    model.eval()
    note, ep, shapes = "", None, None
    try:
        if dynamic:
            shapes = _dynamic_shapes(model, args, kwargs, dynamic_dims)
            try:
                ep = torch.export.export(model, *_fresh(args, kwargs), dynamic_shapes=shapes, strict=False)
            except Exception as exc:  # noqa: BLE001 - any export failure falls back to static shapes
                note = f"static shapes (dynamic export failed: {_export_error(exc)[:160]})"
                shapes = None
        if ep is None:
            # Static shapes; non-strict first, then Dynamo (strict), which evaluates Python-level
            # shape logic such as ``is_causal=L > 1`` that non-strict tracing leaves symbolic.
            errors = []
            for strict in (False, True):
                torch._dynamo.reset()  # a failed trace can leave Dynamo state behind
                try:
                    ep = torch.export.export(model, *_fresh(args, kwargs), strict=strict)
                    break
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{'strict' if strict else 'non-strict'}: {_export_error(exc)}")
            if ep is None:
                raise RuntimeError("torch.export could not capture the model (" + "; ".join(errors) + ")")
    finally:
        model.train(was_training)
    if shapes is not None:
        fixed = _specialised_dims(ep, dynamic_dims)
        if fixed:  # Dim.AUTO keeps a dim static when tracing equates it with a constant (e.g. L == head_dim)
            note = "static shapes (export specialised " + ", ".join(fixed) + "; try other example sizes)"
            shapes = None
    gm = unlift(ep)
    _strip_asserts(gm)
    return Capture(gm=gm, args=args, kwargs=kwargs, dynamic=shapes is not None, note=note, dynamic_shapes=shapes)


def _specialised_dims(ep, dynamic_dims) -> list[str]:
    """Requested-dynamic dims of the user inputs that the exported program kept static, as
    ``"input_ids dim 1 = 16"``; inputs are matched to placeholders by name (positional inputs whose
    names export changed are not checked)."""
    users = set(ep.graph_signature.user_inputs)
    out = []
    for node in ep.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in users else None
        if not isinstance(val, torch.Tensor):
            continue
        if dynamic_dims is not None:
            dims = dynamic_dims.get(node.name) or ()
        else:
            dims = range(min(2, val.dim())) if val.dim() >= 2 else ()
        out += [f"{node.name} dim {d} = {val.shape[d]}" for d in dims
                if d < val.dim() and isinstance(val.shape[d], int) and val.shape[d] > 1]
    return out


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def record(cap: Capture, gm: fx.GraphModule, wanted) -> tuple[Any, dict[fx.Node, Any]]:
    """Run ``gm`` on the captured inputs; return its (unflattened) output and the values of ``wanted`` nodes."""
    rec = _Recorder(gm, set(wanted))
    with torch.no_grad():
        flat_out = rec.run(*cap.flat_inputs())
    spec = getattr(gm, "_out_spec", None)
    out = pytree.tree_unflatten(pytree.tree_leaves(flat_out), spec) if spec is not None else flat_out
    return out, rec.values
