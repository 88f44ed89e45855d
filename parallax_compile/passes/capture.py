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

from ..checks import float64_outputs


@dataclass
class Capture:
    """A captured model: the unlifted ``GraphModule`` and the example inputs it was traced with."""

    gm: fx.GraphModule
    args: tuple
    kwargs: dict[str, Any]
    dynamic: bool
    note: str = ""
    dynamic_shapes: Any = field(default=None, repr=False)
    leaves: list = field(default_factory=list, repr=False)
    """``(input name, requested dynamic dims)`` per flat input, in placeholder order."""

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


def _requested_dims(model, args, kwargs, dynamic_dims) -> tuple[dict, list]:
    """The dims asked to be dynamic: ``(dynamic_shapes for torch.export, [(label, dims)] per flat
    input leaf in the order of ``pytree.tree_leaves((args, kwargs))``)``. ``dynamic_dims`` keys are
    input names or positions (either works for a positional input); default: dims 0 and 1 of every
    tensor input of rank >= 2. Raises ``ValueError`` for a key that names no input."""
    if dynamic_dims is not None and not isinstance(dynamic_dims, dict):
        raise TypeError(f"dynamic_dims must be a dict {{input name or position: dims}}, got {type(dynamic_dims).__name__}")
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    names = list(bound.arguments)
    known = set(names) | set(range(len(args))) | set(kwargs)
    unknown = [key for key in (dynamic_dims or {}) if key not in known]
    if unknown:
        raise ValueError(f"dynamic_dims: {unknown[0]!r} is not an input of {type(model).__name__}.forward "
                         f"(inputs: {', '.join(names)}; positions 0..{len(args) - 1})")

    def dims_for(keys, value):
        if not isinstance(value, torch.Tensor):
            return ()
        if dynamic_dims is None:
            return tuple(range(min(2, value.dim()))) if value.dim() >= 2 else ()
        for key in keys:
            if key in dynamic_dims:
                return tuple(int(d) % max(1, value.dim()) for d in dynamic_dims[key])
        return ()

    shapes, leaves = {}, []
    for i, name in enumerate(names):
        value, kind = bound.arguments[name], sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            dims = {k: dims_for((k,), v) for k, v in value.items()}
            shapes[name] = {k: ({d: torch.export.Dim.AUTO for d in ds} or None) for k, ds in dims.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            dims = {j: dims_for((i + j,), v) for j, v in enumerate(value)}
            shapes[name] = tuple({d: torch.export.Dim.AUTO for d in ds} or None for ds in dims.values())
        else:
            ds = dims_for((name, i) if i < len(args) else (name,), value)
            shapes[name] = {d: torch.export.Dim.AUTO for d in ds} or None
    # Per flat leaf, in the order export numbers the user inputs.
    for i, value in enumerate(args):
        name = names[i] if i < len(names) else str(i)
        leaves += [(name, dims_for((name, i), v)) for v in pytree.tree_leaves(value)]
    for key, value in kwargs.items():
        leaves += [(key, dims_for((key,), v)) for v in pytree.tree_leaves(value)]
    return shapes, leaves


def _is_static(size) -> bool:
    """Whether an exported dim is a constant: an int, or a symbol export pinned to one value (a
    dim that tracing equated with a static one keeps a ``SymInt`` whose range is one point)."""
    if isinstance(size, int):
        return True
    node = size.node
    expr = node.shape_env.replace(node.expr)
    if expr.is_number:
        return True
    vr = node.shape_env.var_to_range.get(expr)
    return vr is not None and vr.lower == vr.upper


def specialised_dims(gm: fx.GraphModule, cap_or_leaves) -> list[str]:
    """Requested-dynamic dims of the user inputs that ``gm`` (an unlifted exported graph) keeps
    static, as ``"input_ids dim 1 = 16"``; placeholders are matched to inputs by position."""
    leaves = cap_or_leaves.leaves if isinstance(cap_or_leaves, Capture) else cap_or_leaves
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = []
    for node, (label, dims) in zip(holders, leaves):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        out += [f"{label} dim {d} = {int(val.shape[d])}" for d in dims
                if d < val.dim() and _is_static(val.shape[d]) and int(val.shape[d]) > 1]
    return out


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
    gm.register_forward_pre_hook(_positional_as_spec, with_kwargs=True, prepend=True)
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
def _positional_as_spec(module, args, kwargs):
    """Let ``conv(x=x)`` call a module exported as ``conv(x)`` (and the reverse): rebind the call to
    the signature ``forward`` shows, then split it as the example inputs were (export's input spec)."""
    spec = getattr(module, "_in_spec", None)
    if spec is None or spec.num_children != 2:
        return None
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    n_args, keys = children[0].num_children, list(children[1].context or [])
    if len(args) == n_args and sorted(kwargs) == sorted(keys):
        return None
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return None  # export's own check names the mismatch
    names = list(inspect.signature(module.forward).parameters)
    values = dict(bound.arguments)
    new_args = tuple(values.pop(n) for n in names[:n_args] if n in values)
    return new_args, {k: values[k] for k in keys if k in values}


def _set_training(model: torch.nn.Module, mode: bool) -> None:
    """``model.train(mode)``; an ``ExportedProgram.module()`` refuses it, and its graph is fixed anyway."""
    try:
        model.train(mode)
    except NotImplementedError:
        pass


def original_float64(model: torch.nn.Module, cap: Capture):
    """``model``'s outputs on the capture's inputs, run as it was captured (eval mode, no KV cache)
    on a float64 copy: the exact reference of
    :func:`~parallax_compile.checks.within_fp32_rounding`; ``None`` when it cannot run in float64."""
    with cache_disabled(model, cap.kwargs):
        return float64_outputs(model, cap.args, cap.kwargs, prepare=lambda m: _set_training(m, False))


def capture(model: torch.nn.Module, example_inputs, *, dynamic_dims=None, dynamic: bool = True) -> Capture:
    """Export ``model`` on ``example_inputs`` and return the unlifted, guard-free graph.

    ``example_inputs``: a Tensor, a tuple of positional inputs, a dict of keyword inputs or
    ``(args, kwargs)``. ``dynamic_dims``: ``{input name or position: {dim: label}}``; default
    marks dims 0 and 1 (batch, sequence) of every tensor input dynamic.
    A Hugging Face model that would return a KV cache is captured with ``use_cache=False``
    (:func:`cache_disabled`; the report's note says so).
    Raises ``RuntimeError`` naming the export error when the model cannot be exported at all.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    with cache_disabled(model, kwargs) as cache_note:
        cap = _capture(model, args, kwargs, dynamic_dims, dynamic)
    if cache_note:
        cap.note = "; ".join(n for n in (cache_note, cap.note) if n)
    return cap


def _capture(model, args, kwargs, dynamic_dims, dynamic) -> Capture:
    requested, leaves = _requested_dims(model, args, kwargs, dynamic_dims)
    was_training = model.training
    _set_training(model, False)
    note, ep, shapes = "", None, None
    try:
        if dynamic:
            shapes = requested
            try:
                ep = torch.export.export(model, *_fresh(args, kwargs), dynamic_shapes=shapes, strict=False)
            except Exception as exc:  # noqa: BLE001 - any export failure falls back to static shapes
                note = f"static shapes (dynamic export failed: {_export_error(exc)[:160]})"
                shapes = None
        if ep is None:
            # Static shapes; non-strict first, then Dynamo (strict), which evaluates Python-level
            # shape logic such as ``is_causal=L > 1`` that non-strict tracing leaves symbolic.
            errors, untraceable = [], None
            for strict in (False, True):
                torch._dynamo.reset()  # a failed trace can leave Dynamo state behind
                try:
                    ep = torch.export.export(model, *_fresh(args, kwargs), strict=strict)
                    break
                except Exception as exc:  # noqa: BLE001
                    untraceable = untraceable or _untraceable_op(exc)
                    errors.append(f"{'strict' if strict else 'non-strict'}: {_export_error(exc)}")
            if ep is None and untraceable:
                raise RuntimeError(untraceable)
            if ep is None:
                raise RuntimeError("torch.export could not capture the model (" + "; ".join(errors) + ")")
    finally:
        _set_training(model, was_training)
    gm = unlift(ep)
    _strip_asserts(gm)
    cap = Capture(gm=gm, args=args, kwargs=kwargs, dynamic=shapes is not None, note=note, dynamic_shapes=shapes,
                  leaves=leaves)
    if shapes is not None:
        mark_specialised(cap, "export")
    return cap


WORKAROUNDS = {
    "aten.linalg_lstsq.default": "for a square (ridge) system write torch.linalg.solve(A, b) or "
                                 "torch.cholesky_solve(b, torch.linalg.cholesky(A)), which give the "
                                 "same solution",
}


def _untraceable_op(exc: BaseException) -> str | None:
    """One line naming the op that fake tensors cannot run (no meta kernel, or an output shape
    that depends on data) and the workaround, when that is why export failed; else None."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, UnsupportedOperatorException

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (DynamicOutputShapeException, UnsupportedOperatorException)):
            op = str(exc.func) if getattr(exc, "func", None) is not None else str(exc).strip().splitlines()[0]
            fix = WORKAROUNDS.get(op, "replace the call by ops that have meta kernels, or register one "
                                      "with torch.library.register_fake")
            return (f"torch.export could not capture the model: `{op}` has no meta kernel for its output "
                    f"shape, so export cannot trace it; workaround: {fix}")
        exc = exc.__cause__ or exc.__context__
    return None


def mark_specialised(cap: Capture, by: str) -> None:
    """If a requested-dynamic dim of ``cap.gm``'s inputs is static (export tied it to a constant, or
    a later pass guarded on it), say so in ``cap.note`` and clear ``cap.dynamic``: the module then
    accepts only the example's size of that dim."""
    fixed = specialised_dims(cap.gm, cap)
    if fixed:
        cap.note = f"static shapes ({by} specialised " + ", ".join(fixed) + "; try other example sizes)"
        cap.dynamic, cap.dynamic_shapes = False, None


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
