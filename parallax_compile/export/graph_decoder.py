"""A causal decoder converted as a graph (``parallax_compile.convert`` / ``load``: nanoGPT, a
factory's model) with a KV cache, in the layout :mod:`.onnx_decoder` uses for Hugging Face
decoders (``L`` Parallax sites; ``P`` = ``past_sequence_length``, ``S`` = ``sequence_length``)::

    <token input>              int64 [batch_size, S]          (the model's own name, e.g. nanoGPT's idx)
    past_key_values.N.key      float [batch_size, Hkv, P, D]  N = 0 .. L-1 (and .value)
    ->
    logits                     float [batch_size, S, vocab]   (then the model's other outputs, if any)
    present.N.key              float [batch_size, Hkv, P + S, D]   (and .value)

How (:func:`with_kv_cache`, on a copy of the converted ``fx`` graph): each Parallax site gets its
past keys and values as new inputs, concatenated before the op along the sequence dim (the
concatenation is ``present``); the site's causal mask becomes the op's own end-aligned causal flag
(SPEC section 5: query row ``i`` sees keys ``j <= P + i``); the position computation
``arange(0, S)`` becomes ``arange(P, P + S)``. Only K and V are cached; ``r`` is computed from the
new tokens like ``q`` (SPEC section 5).

That is exact for every input only when every other computation acts on each position on its own.
The transformation proves it by following the sequence axis through the graph, op by op
(:class:`_Axes`): elementwise ops, linear layers, norms over features, embeddings,
reshapes that keep the axis whole, transposes, splits and concatenations off the axis,
reductions off the axis; the only op that mixes positions is the Parallax op; the sequence length
is used only as a shape, or as ``arange(0, S)`` (the positions). Anything else (a non-causal or
cross-attention site, a mask that is not a proven causal one, inputs besides the tokens, positions
computed another way, e.g. ``cumsum``, a position table sliced by the length, an op not known to
act position by position) raises :class:`NoKVCache` with one line saying which node and why.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from ..passes.graph_ops import DROPOUTS, same_size, size_expr
from ..passes.match import CASTS, RESHAPES, shape_of, val
from ..passes.parallax_pattern import proven_lower_triangular
from ..passes.rewrite import drop_dead_code

__all__ = ["KVCacheGraph", "NoKVCache", "export_graph_decoder_onnx", "recompute_greedy", "with_kv_cache"]

aten = torch.ops.aten


class NoKVCache(ValueError):
    """The model gets no KV-cache variant; the message (one line) says why."""


@dataclass
class KVCacheGraph:
    """What :func:`with_kv_cache` built: ``module`` is called as
    ``module(tokens, past_0_key, past_0_value, past_1_key, ...)`` and returns
    ``(*outputs, present_0_key, present_0_value, ...)`` (positional, flat)."""

    module: fx.GraphModule
    token_input: str
    """The converted model's name for its token input (``idx`` for nanoGPT, ``input_ids`` ...)."""
    output_names: list[str]
    """ONNX names of the model's own outputs (the first, ``logits``, is what greedy decoding reads)."""
    kv_shapes: list[tuple[int, int]]
    """Per site: ``(num_kv_heads, head_dim)``; the cache dtype is ``kv_dtype``."""
    kv_dtype: torch.dtype


# --- the sequence axis through the graph ----------------------------------------------------------

_SCALAR_TARGETS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
_NEUTRAL = {aten._assert_scalar.default, aten._assert_tensor_metadata.default,
            aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default}
_SAME = CASTS | DROPOUTS | {aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
                            aten.ones_like.default, aten.zeros_like.default, aten.full_like.default}
_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
_SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default, aten.log_softmax.int,
              aten._log_softmax.default}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.any.dim,
               aten.all.dim, aten.max.dim, aten.min.dim}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
_MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default}
_VIEWS = RESHAPES | {aten.flatten.using_ints, aten.unflatten.int}


def _prod(dims):
    return math.prod(size_expr(d) for d in dims) if dims else size_expr(1)


def _where(node: fx.Node) -> str:
    """``aten.cumsum at node cumsum_1 (module transformer.h.0)``: where a refusal happened."""
    target = getattr(node.target, "__name__", None) or str(node.target)
    if hasattr(node.target, "_schema"):
        target = f"aten.{node.target._schema.name.split('::')[-1]}"
    stack = node.meta.get("nn_module_stack") or {}
    owner = list(stack.values())[-1][0] if stack else ""
    return f"{target} (node {node.name}" + (f", in {owner})" if owner else ")")


def _flat(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flat(a))
        else:
            out.append(a)
    return out


class _Axes:
    """The sequence axis of every value: an int (the dim that indexes positions), ``None`` (the
    value does not depend on the tokens, e.g. a weight or a constant table), or a tuple of those for
    ops returning several tensors. ``positions``: the ``arange(0, S)`` nodes found."""

    def __init__(self, token: fx.Node, seq):
        self.seq, self.axis = seq, {token: 1}
        self.positions: list[fx.Node] = []

    def is_seq(self, d) -> bool:
        return isinstance(d, torch.SymInt) and same_size(d, self.seq)

    def mentions_seq(self, x) -> bool:
        """A scalar argument whose value depends on the sequence length."""
        v = val(x) if isinstance(x, fx.Node) else x
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self.seq.node.expr.free_symbols <= v.node.expr.free_symbols
        return False

    def of(self, x):
        return self.axis.get(x) if isinstance(x, fx.Node) else None

    def run(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function":
                try:
                    self.axis[node] = self.rule(node)
                except NoKVCache:
                    raise
                except Exception as e:  # noqa: BLE001 - a form the rules did not foresee: refuse
                    raise NoKVCache(f"{_where(node)} could not be analysed ({type(e).__name__}: {e})") from e
            elif node.op in ("call_module", "call_method"):
                raise NoKVCache(f"{node.op} {node.target} (node {node.name}) is not an ATen op")

    def rule(self, node: fx.Node):
        t, args = node.target, node.args
        tensors = [a for a in _flat([*args, *node.kwargs.values()]) if isinstance(a, fx.Node)
                   and self.of(a) is not None]
        lengths = [a for a in _flat([*args, *node.kwargs.values()]) if self.mentions_seq(a)]
        v = val(node)
        if t in _NEUTRAL:
            return None
        if t is operator.getitem:
            parent = self.of(args[0])
            if isinstance(parent, int):
                raise NoKVCache(f"{_where(node)} indexes a tensor in Python")
            return parent[args[1]] if isinstance(parent, tuple) else None
        if not isinstance(v, (torch.Tensor, list, tuple)):  # a Python number (a size...) or nothing
            if v is not None and _scalar_op(t):
                return None
            if tensors or lengths:
                raise NoKVCache(f"{_where(node)} turns a tensor into a Python number, or has no shape "
                                "information")
            return None
        if t is torch.ops.parallax.attention.default:
            return self.attention(node)
        if t in _ARANGES:
            return self.arange(node)
        if not tensors and not lengths:
            return None  # computed from weights and constants only
        if lengths and t not in _VIEWS | {aten.expand.default, aten.slice.Tensor}:
            raise NoKVCache(f"{_where(node)} uses the sequence length as a value, not only as a shape")
        if not isinstance(v, torch.Tensor) and not (isinstance(v, (list, tuple)) and t in _SPLITS):
            raise NoKVCache(f"{_where(node)} turns a tensor into a Python number")
        x = args[0] if args else None
        ax = self.of(x)
        rank = v.dim() if isinstance(v, torch.Tensor) else None
        in_rank = len(shape_of(x)) if isinstance(x, fx.Node) and shape_of(x) is not None else None
        if t in _SAME:
            return ax  # other tensor arguments (type_as) give only a dtype; *_like: the same value everywhere
        if getattr(t, "_schema", None) is not None and t._schema.is_mutable and ax is None:
            raise NoKVCache(f"{_where(node)} writes token data into a buffer (a stateful model)")
        if torch.Tag.pointwise in getattr(t, "tags", ()):
            return self.broadcast(node, tensors, rank)
        if t is aten.linear.default or t in _NORMS:
            self.only_first(node, tensors)
            features = 1 if t is aten.linear.default else len(args[1])
            if ax >= in_rank - features:
                raise NoKVCache(f"{_where(node)} mixes the sequence axis into its features")
            return (ax, ax, ax) if t is aten.native_layer_norm.default else ax
        if t in _SOFTMAXES:
            self.only_first(node, tensors)
            if args[1] % in_rank == ax:
                raise NoKVCache(f"{_where(node)} normalises over the sequence axis")
            return ax
        if t in _REDUCTIONS:
            self.only_first(node, tensors)
            dims = args[1] if len(args) > 1 else None
            dims = [dims] if isinstance(dims, int) else dims
            if not dims or ax in [d % in_rank for d in dims]:
                raise NoKVCache(f"{_where(node)} reduces over the sequence axis")
            keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            out = ax if keep else ax - sum(d % in_rank < ax for d in dims)
            return (out, out) if isinstance(v, (list, tuple)) else out
        if t is aten.embedding.default:
            if self.of(args[0]) is not None:
                raise NoKVCache(f"{_where(node)} looks up a table computed from the tokens")
            return self.of(args[1])
        if t in _MATMULS:
            return self.matmul(node, rank)
        if t in _VIEWS:
            return self.reshape(node, x, ax, v)
        if t is aten.unsqueeze.default:
            return ax + (args[1] % rank <= ax)
        if t in (aten.squeeze.dim, aten.squeeze.dims):
            dims = [args[1]] if isinstance(args[1], int) else list(args[1])
            dims = [d % in_rank for d in dims]
            if ax in dims or any(not isinstance(shape_of(x)[d], int) for d in dims):
                raise NoKVCache(f"{_where(node)} squeezes the sequence axis or a dynamic dim")
            return ax - sum(d < ax for d in dims if shape_of(x)[d] == 1)
        if t is aten.transpose.int:
            d0, d1 = args[1] % in_rank, args[2] % in_rank
            return d1 if ax == d0 else d0 if ax == d1 else ax
        if t is aten.t.default:
            return in_rank - 1 - ax
        if t is aten.permute.default:
            return [d % in_rank for d in args[1]].index(ax)
        if t is aten.expand.default:
            return self.expand(node, x, ax, v)
        if t is aten.constant_pad_nd.default:  # pads [last_lo, last_hi, second_last_lo, ...]
            pads = list(args[1])
            if any(pads[2 * i:2 * i + 2] != [0, 0] for i in range(len(pads) // 2) if in_rank - 1 - i == ax):
                raise NoKVCache(f"{_where(node)} pads the sequence axis")
            return ax
        if t is aten.slice.Tensor:
            return self.slice(node, ax, in_rank)
        if t is aten.select.int:
            if args[1] % in_rank == ax:
                raise NoKVCache(f"{_where(node)} picks one position")
            return ax - (args[1] % in_rank < ax)
        if t in _SPLITS:
            dim = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
            if t is aten.unbind.int:
                dim = args[1] if len(args) > 1 else 0
            if dim % in_rank == ax:
                raise NoKVCache(f"{_where(node)} splits the sequence axis")
            out = ax - (dim % in_rank < ax) if t is aten.unbind.int else ax
            return tuple(out for _ in v)
        if t is aten.cat.default:
            dim = args[1] if len(args) > 1 else 0
            axes = {self.of(a) for a in args[0] if self.of(a) is not None}
            if len(axes) != 1 or dim % rank in axes:
                raise NoKVCache(f"{_where(node)} concatenates along the sequence axis")
            return axes.pop()
        raise NoKVCache(f"{_where(node)} is not known to act on each position on its own")

    def only_first(self, node, tensors) -> None:
        """Weights, biases and tables must not depend on the tokens."""
        if any(a is not node.args[0] for a in tensors):
            raise NoKVCache(f"{_where(node)} takes a tokens-dependent tensor where a weight is expected")

    def broadcast(self, node, tensors, rank):
        aligned = {self.of(a) + rank - len(shape_of(a)) for a in tensors}
        if len(aligned) != 1:
            raise NoKVCache(f"{_where(node)} combines different axes of the sequence")
        return aligned.pop()

    def matmul(self, node, rank):
        a, b = node.args[:2]
        ra, rb = len(shape_of(a)), len(shape_of(b))
        if self.of(b) is None and self.of(a) is not None and ra >= 2 and self.of(a) < ra - 1:
            return self.of(a) + rank - ra
        if self.of(a) is None and self.of(b) == rb - 1 and rb >= 2:
            return rank - 1
        raise NoKVCache(f"{_where(node)} multiplies across the sequence axis (attention outside a Parallax "
                        "site?)")

    def reshape(self, node, x, ax, v):
        if ax is None:
            raise NoKVCache(f"{_where(node)} reshapes a constant to the sequence length")
        shape = shape_of(x)
        if self.is_seq(shape[ax]):
            for j, d in enumerate(v.shape):
                if self.is_seq(d) and same_size(_prod(v.shape[:j]), _prod(shape[:ax])):
                    return j
        raise NoKVCache(f"{_where(node)} merges or splits the sequence axis")

    def expand(self, node, x, ax, v):
        sizes = node.args[1]
        seq_dims = [j for j, d in enumerate(v.shape) if self.mentions_seq(d)]
        if ax is None:
            if seq_dims and (len(seq_dims) > 1 or not self.is_seq(v.shape[seq_dims[0]])):
                raise NoKVCache(f"{_where(node)} expands a constant to a size computed from the sequence "
                                "length")
            return seq_dims[0] if seq_dims else None  # the same values at every position
        out = ax + len(sizes) - len(shape_of(x))
        if any(j != out for j in seq_dims):
            raise NoKVCache(f"{_where(node)} expands to a size computed from the sequence length")
        return out

    def slice(self, node, ax, in_rank):
        defaults = [None, 0, None, None, 1]
        x, dim, start, end, step = list(node.args) + defaults[len(node.args):]
        dim, start = dim % in_rank, 0 if start is None else start
        if ax is None or dim != ax:
            if self.mentions_seq(start) or self.mentions_seq(end):
                raise NoKVCache(f"{_where(node)} slices a table by the sequence length (positions computed "
                                "this way are not supported)")
            return ax
        whole = end is None or (isinstance(end, int) and end >= 2**62) or (
            isinstance(end, fx.Node) and self.is_seq(val(end)))
        if start == 0 and step in (1, None) and whole:
            return ax  # the whole axis
        raise NoKVCache(f"{_where(node)} takes part of the sequence")

    def arange(self, node):
        args = list(node.args)
        start, end, step = (0, args[0], 1) if node.target is aten.arange.default else (args + [1])[:3]
        if not any(self.mentions_seq(a) for a in (start, end, step)):
            return None
        if start == 0 and step == 1 and isinstance(end, fx.Node) and self.is_seq(val(end)):
            self.positions.append(node)
            return 0
        raise NoKVCache(f"{_where(node)} computes positions other than arange(0, sequence_length)")

    def attention(self, node):
        q, r, k, v = node.args[:4]
        if any(self.of(a) != 2 for a in (q, r, k, v)):
            raise NoKVCache(f"Parallax site {_where(node)}: q, r, k, v do not all index positions on dim 2")
        return (2, 2, 2, 2)


def _scalar_op(target) -> bool:
    modules = ("_operator", "math", "torch", "torch.fx.experimental.sym_node")
    return getattr(target, "__module__", "") in modules or target in _SCALAR_TARGETS


# --- the transformation ---------------------------------------------------------------------------


def _op_args(node: fx.Node) -> list:
    names = ("q", "r", "k", "v", "attn_mask", "scale", "causal", "window_size")
    defaults = [None, None, None, None, None, None, False, None]
    args = list(node.args) + defaults[len(node.args):]
    for i, name in enumerate(names):
        if name in node.kwargs:
            args[i] = node.kwargs[name]
    return args


def _names_of_outputs(gm: fx.GraphModule, count: int) -> list[str]:
    from .onnx import names_from_spec

    spec = getattr(gm, "_out_spec", None)
    if spec is None:  # unlifted programs keep it in their pytree codegen
        spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    names = names_from_spec(spec) if spec is not None and spec.num_leaves == count else []
    names = names or [f"output_{i}" for i in range(count)]
    if names[0] in ("output", "output_0"):
        names[0] = "logits"  # the [batch, sequence, vocab] output greedy decoding reads
    return names


def _drop_empty_row_guard(mask: fx.Node, op: fx.Node, where: str) -> None:
    """The rewrite keeps softmax's NaN on a row with every key masked as
    ``where(any(mask, -1), out, nan)``; a causal mask keeps the diagonal, so no row is empty and the
    guard is the identity: route its users to ``out``. Any other use of the mask refuses."""
    rank = len(shape_of(mask))
    for user in list(mask.users):
        if user is op:
            continue
        if user.target is aten.any.dim and user.args[1] % rank == rank - 1:
            for guard in list(user.users):
                if guard.target in (aten.where.ScalarOther, aten.where.self) and guard.args[0] is user:
                    guard.replace_all_uses_with(guard.args[1])
                    continue
                raise NoKVCache(f"Parallax site {where}: its mask is also used by {_where(guard)}")
            continue
        raise NoKVCache(f"Parallax site {where}: its mask is also used by {_where(user)}")


def with_kv_cache(gm: fx.GraphModule) -> KVCacheGraph:
    """A copy of the converted ``gm`` (from :func:`parallax_compile.convert` or
    :func:`parallax_compile.load`; parameters shared, ``gm`` untouched) that takes and returns a KV
    cache (module docstring for the layout and the conditions).

    Raises :class:`NoKVCache` (one line naming the node and the reason) when the result would not
    be exact for every input: then no KV-cache variant exists for the model."""
    import torch.fx.graph as fx_graph

    parallax = torch.ops.parallax.attention.default
    if any(n.op == "call_function" and "val" not in n.meta for n in gm.graph.nodes):
        # nodes the rewrite inserted carry no shapes: export the module again to get them all
        from ..passes.capture import unlift
        from .program import program

        gm = unlift(program(gm))
    graph = copy.deepcopy(gm.graph)
    tokens = []
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        if isinstance(val(node), torch.Tensor):
            tokens.append(node)
        elif node.users:
            raise NoKVCache(f"the model's non-tensor input {node.target!r} is used by the graph")
        else:
            graph.erase_node(node)
    if len(tokens) != 1:
        given = ", ".join(n.target for n in tokens)
        raise NoKVCache(f"the model takes {len(tokens)} tensor inputs ({given}); the KV-cache variant needs "
                        "exactly one, the [batch, sequence] token ids (an attention mask or position input "
                        "is not supported)")
    (token,) = tokens
    tv = val(token)
    if tv.dim() != 2 or tv.dtype.is_floating_point or tv.dtype.is_complex:
        raise NoKVCache(f"the input {token.target!r} is {tuple(tv.shape)} {tv.dtype}, not [batch, sequence] "
                        "token ids")
    batch, seq = tv.shape
    if not isinstance(seq, torch.SymInt) or not isinstance(batch, torch.SymInt):
        raise NoKVCache(f"the conversion has a static batch or sequence length ({tuple(tv.shape)}); a KV "
                        "cache needs both dynamic")
    sites = [n for n in graph.nodes if n.op == "call_function" and n.target is parallax]
    if not sites:
        raise NoKVCache("the model has no Parallax site")
    cache = []
    for node in sites:
        q, r, k, v, mask, scale, causal, window = _op_args(node)
        where = _where(node)
        qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
        if not (same_size(qs[2], seq) and same_size(ks[2], seq)):
            raise NoKVCache(f"Parallax site {where} attends to keys of length {ks[2]}, not the input's "
                            "sequence (cross-attention)")
        if not (same_size(ks[0], batch) and isinstance(ks[1], int) and isinstance(ks[3], int)
                and vs[3] == ks[3]):
            raise NoKVCache(f"Parallax site {where}: k is {tuple(ks)} and v {tuple(vs)}, not [batch, "
                            "num_kv_heads, sequence, head_dim] with one head_dim")
        if mask is not None:
            ms = shape_of(mask)
            proven = (ms is not None and val(mask).dtype == torch.bool and len(ms) >= 2
                      and same_size(ms[-2], seq) and same_size(ms[-1], seq)
                      and proven_lower_triangular(gm, mask))
            if not proven:
                raise NoKVCache(f"Parallax site {where} has a mask that is not a proven causal mask")
            _drop_empty_row_guard(mask, node, where)
        elif not causal:
            raise NoKVCache(f"Parallax site {where} is not causal (bidirectional attention has no KV cache)")
        node.args = (q, r, k, v, None, scale, True, window)
        node.kwargs = {}
        cache.append((k, v))
    drop_dead_code(graph)
    axes = _Axes(token, seq)
    axes.run(graph)
    (out_node,) = [n for n in graph.nodes if n.op == "output"]
    outputs = list(_flat([out_node.args[0]]))
    first = outputs[0] if outputs else None
    if not (isinstance(first, fx.Node) and axes.of(first) == 1 and len(shape_of(first) or ()) == 3):
        raise NoKVCache("the model's first output is not [batch, sequence, vocab] logits")
    names = _names_of_outputs(gm, len(outputs))
    with graph.inserting_after(token):
        past = []
        for i in reversed(range(len(sites))):
            pv = graph.placeholder(f"past_key_values_{i}_value")
            pk = graph.placeholder(f"past_key_values_{i}_key")
            past[:0] = [(pk, pv)]
    with graph.inserting_after(past[-1][1]):
        past_len = graph.call_function(aten.sym_size.int, (past[0][0], 2))
    presents = []
    for node, (pk, pv) in zip(sites, past):
        q, r, k, v, _, scale, causal, window = node.args
        with graph.inserting_before(node):
            k_all = graph.call_function(aten.cat.default, ([pk, k], 2))
            v_all = graph.call_function(aten.cat.default, ([pv, v], 2))
        node.args = (q, r, k_all, v_all, None, scale, causal, window)
        presents += [k_all, v_all]
    for node in axes.positions:
        end = node.args[0] if node.target is aten.arange.default else node.args[1]
        with graph.inserting_before(node):
            shifted_end = graph.call_function(operator.add, (past_len, end))
            shifted = graph.call_function(aten.arange.start, (past_len, shifted_end), dict(node.kwargs))
        node.replace_all_uses_with(shifted)
        graph.erase_node(node)
    out_node.args = (tuple(outputs + presents),)
    graph._codegen = fx_graph.CodeGen()  # positional inputs and a flat tuple out (no pytree specs)
    drop_dead_code(graph)
    graph.lint()
    module = fx.GraphModule(gm, graph, class_name="ParallaxDecoderWithPast")
    kv = [(shape_of(k)[1], shape_of(k)[3]) for k, _ in cache]
    return KVCacheGraph(module=module, token_input=token.target, output_names=names, kv_shapes=kv,
                        kv_dtype=val(cache[0][0]).dtype)


# --- ONNX and the check ----------------------------------------------------------------------------


def export_graph_decoder_onnx(kv: KVCacheGraph, path, *, opset: int | None = None, fp16: bool = False,
                              accumulate: str = "float") -> Path:
    """Write ``kv`` (from :func:`with_kv_cache`) to ``path`` with Optimum's names and symbolic dims
    (module docstring). Returns the path."""
    from .onnx import export_onnx
    from .onnx_decoder import cache_names

    b, s, p = 2, 3, 4  # example sizes; every one is symbolic in the file
    gen = torch.Generator().manual_seed(0)
    device = next(iter(kv.module.parameters())).device
    args = [torch.zeros(b, s, dtype=torch.long, device=device)]
    for heads, dim in kv.kv_shapes:
        args += [torch.randn(b, heads, p, dim, generator=gen).to(device, kv.kv_dtype) for _ in range(2)]
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, *({0: dyn, 2: dyn} for _ in args[1:]))
    past, present = cache_names(len(kv.kv_shapes))
    dims = {kv.token_input: {0: "batch_size", 1: "sequence_length"}}
    dims |= {name: {0: "batch_size", 2: "past_sequence_length"} for name in past}
    with torch.no_grad():
        return export_onnx(kv.module, (tuple(args), {}), path, dynamic_shapes=shapes, opset=opset, fp16=fp16,
                           accumulate=accumulate, input_names=[kv.token_input, *past],
                           output_names=[*kv.output_names, *present], dim_names=dims)


def recompute_greedy(module, token_input: str, prompt: torch.Tensor, new_tokens: int
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy generation by recomputation: each step runs ``module`` on the whole sequence so far
    (no cache). ``prompt`` int64 ``[B, L]``. Returns ``(tokens [B, L + new_tokens], logits per step)``:
    step 0 the prompt's ``[B, L, vocab]``, then the last position's ``[B, 1, vocab]``."""
    from ..checks import main_output

    tokens, steps = prompt, []
    with torch.no_grad():
        for i in range(new_tokens):
            logits = main_output(module(**{token_input: tokens})).float().cpu()
            steps.append(logits if i == 0 else logits[:, -1:])
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1)[:, None].to(tokens.device)], dim=1)
    return tokens.cpu(), steps
