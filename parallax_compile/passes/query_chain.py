"""The query chain: from the block input ``x`` through the query projection, reshapes, per-head
norm and rotary embedding to ``q``; and its replay with the probe ``W_R`` in place of ``W_Q``.

SPEC section 5: ``r`` goes through the same reshape, rotary embedding and per-head norm as ``q``,
but never through the softmax temperature. The replay therefore copies every node between the
projection and ``q``, except multiplications/divisions by a plain number (a scale folded into
the chain, as OPT and Whisper do), with the projection replaced by ``linear(x, W_R)``.

Projections: ``linear(x, W)``, ``addmm(b, x, W)`` (Conv1D) and ``x @ W.T`` (``t`` / ``transpose`` /
``numpy_T`` of the weight, then ``matmul`` / ``mm``: Falcon), with ``W`` a parameter or a block
of its rows (``in_proj_weight[:E]`` / ``split`` / ``chunk``: ``nn.MultiheadAttention``
cross-attention).

Fused projections (GPT-2's ``c_attn``, ``nn.MultiheadAttention``'s ``in_proj``, GPT-NeoX's and
Falcon's ``query_key_value``, Phi-3's ``qkv_proj``) produce q, k and v together; ``W_R`` is
shaped like the **q features** only. Which output features feed ``q`` is found by pushing a
marker (the feature index) through the index-only ops after the projection: a contiguous block
(GPT-2, Phi-3) or any subset (GPT-NeoX and Falcon lay the projection out per head, ``[H, 3, D]``,
so q's features are strided). The probe's output is placed back at exactly those positions of
the fused width (zero elsewhere) so the same split/select ops pick it out again.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from .graph_ops import is_random
from .match import CASTS, DIVS, MULS, Skip, const_value, val

aten = torch.ops.aten

TRANSPOSES = {aten.t.default, aten.transpose.int, aten.numpy_T.default, aten.permute.default}
ROW_BLOCKS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor,
              aten.narrow.default}
INDEX_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, operator.getitem,
    aten.slice.Tensor, aten.select.int, aten.unflatten.int, aten.permute.default, aten.transpose.int,
    aten.contiguous.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.clone.default, aten.t.default, aten.alias.default, aten.flatten.using_ints,
}
NORM_OPS = {aten.layer_norm.default, aten.rms_norm.default, aten.group_norm.default, aten.rsqrt.default}


@dataclass
class QueryChain:
    proj: fx.Node
    """The projection node (``linear`` / ``addmm`` / ``matmul`` with a parameter weight)."""
    x: fx.Node
    """The projection's activation input (the block input, possibly flattened)."""
    weight: str
    """Attribute path of ``W_Q`` (or of the fused QKV weight)."""
    in_features: int
    fused_width: int
    """Output features of the projection (``3 * d`` for a fused QKV projection)."""
    nodes: list[fx.Node]
    """Nodes strictly after the projection up to and including ``q``, in graph order."""
    prefix: list[fx.Node]
    """Index-only nodes right after the projection (where the marker is pushed)."""
    q: fx.Node
    features: list[int] = field(default_factory=list)
    """The projection's output features that feed ``q``, ascending (row ``i`` of ``W_R`` takes
    the place of feature ``features[i]``); filled by :func:`locate_query_block`."""
    weight_rows: tuple[int, int] | None = None
    """``(start, stop)`` when the projection's weight is a block of rows of the parameter
    ``weight`` (``in_proj_weight[:E]``); None for the whole parameter."""
    weight_transposed: bool = False
    """The parameter is stored ``[in, out]`` (Conv1D's ``addmm(b, x, W)``) rather than ``[out, in]``."""
    description: list[str] = field(default_factory=list)

    @property
    def out_features(self) -> int:
        """Rows of ``W_R``: the number of q features."""
        return len(self.features)

    @property
    def offset(self) -> int | None:
        """First q feature when the q features are one contiguous block, else None."""
        f = self.features
        return f[0] if f and f[-1] - f[0] + 1 == len(f) else None

    def query_weight(self, param: torch.Tensor) -> torch.Tensor:
        """The rows of ``W_Q`` that produce ``q`` (``[out_features, in_features]``), from the
        projection's parameter ``param`` (the tensor at :attr:`weight`)."""
        w = param.t() if self.weight_transposed else param
        if self.weight_rows is not None:
            w = w[self.weight_rows[0]:self.weight_rows[1]]
        return w[torch.tensor(self.features, device=w.device)]

    def marker_inputs(self) -> set[fx.Node]:
        """Nodes whose values :func:`locate_query_block` needs."""
        need = {self.proj}
        for n in self.prefix:
            for a in n.all_input_nodes:
                if a is not self.proj and a not in self.prefix:
                    need.add(a)
        return need


def _param(gm, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.nn.Parameter) else None
    return None


def _weight_block(gm, node) -> tuple[fx.Node, tuple[int, int] | None] | None:
    """``(parameter node, rows)`` when ``node`` is a parameter or a block of its rows along dim 0
    (``split`` / ``chunk`` / ``slice`` / ``narrow``); ``rows`` is None for the whole parameter."""
    if _param(gm, node) is not None:
        return node, None
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    shp = val(node).shape if isinstance(val(node), torch.Tensor) else None
    if node.target is operator.getitem:
        src, i = node.args
        if not (isinstance(src, fx.Node) and src.target in ROW_BLOCKS and isinstance(i, int)):
            return None
        dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
        inner = _weight_block(gm, src.args[0])
        if dim != 0 or inner is None or inner[1] is not None or shp is None:
            return None
        sizes = [int(t.shape[0]) for t in val(src)]
        start = sum(sizes[:i])
        return inner[0], (start, start + sizes[i])
    if node.target in (aten.slice.Tensor, aten.narrow.default) and shp is not None:
        args = list(node.args) + [None] * 4
        dim, inner = args[1] if args[1] is not None else 0, _weight_block(gm, args[0])
        if dim != 0 or inner is None or inner[1] is not None:
            return None
        if node.target is aten.narrow.default:
            start = args[2]
        else:
            start, step = args[2] or 0, args[4] or 1
            if step != 1:
                return None
        full = _param(gm, inner[0]).shape[0]
        if not isinstance(start, int):
            return None
        start = start + full if start < 0 else start
        return inner[0], (start, start + int(shp[0]))
    return None


def _transposed_weight(n) -> fx.Node | None:
    """The weight under ``W.t()`` / ``W.T`` / ``W.transpose(0, 1)`` / ``W.permute(1, 0)``."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in TRANSPOSES):
        return None
    if n.target is aten.permute.default and [p % 2 for p in n.args[1]] != [1, 0]:
        return None
    if n.target is aten.transpose.int and {d % 2 for d in n.args[1:3]} != {0, 1}:
        return None
    return n.args[0]


def projection(gm, n: fx.Node):
    """``(x, weight_node, out_features, in_features, rows, stored_transposed)`` when ``n`` applies
    a 2-D parameter weight (or a block of its rows) to ``x``: ``linear(x, W)``,
    ``addmm(b, x, W)`` / ``mm`` / ``matmul`` with ``W`` stored ``[in, out]``, or with ``W.T``."""
    if n.op != "call_function":
        return None
    if n.target is aten.linear.default:
        block = _weight_block(gm, n.args[1])
        if block is None or _param(gm, block[0]).dim() != 2:
            return None
        f, d = val(n.args[1]).shape
        return n.args[0], block[0], int(f), int(d), block[1], False
    if n.target in (aten.addmm.default, aten.mm.default, aten.matmul.default):
        x, wn = (n.args[1], n.args[2]) if n.target is aten.addmm.default else (n.args[0], n.args[1])
        inner = _transposed_weight(wn)
        block = _weight_block(gm, inner if inner is not None else wn)
        if block is None or _param(gm, block[0]).dim() != 2:
            return None
        if inner is not None:
            f, d = val(inner).shape
        else:
            d, f = val(wn).shape
            if block[1] is not None:
                return None  # rows of an [in, out] weight are input features
        return x, block[0], int(f), int(d), block[1], inner is None
    return None


def find_query_chain(gm: fx.GraphModule, q: fx.Node, limit: int = 400) -> QueryChain:
    """Walk back from ``q`` to its projection. Raises :class:`Skip` with the reason when ``q`` is not
    a replayable function of one parameter projection of the block input."""
    seen, frontier, projs = {q}, [q], []
    while frontier:
        n = frontier.pop()
        if n.op != "call_function":
            continue
        if n is not q and projection(gm, n) is not None:
            projs.append(n)
            continue
        if n is q and projection(gm, n) is not None:
            projs.append(n)
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                frontier.append(a)
                if len(seen) > limit:
                    raise Skip("the query chain is too long to replay")
    if not projs:
        raise Skip("no query projection found (q is not computed by a linear layer from the block input)")
    if len(set(projs)) > 1:
        raise Skip("q mixes several projections; the chain cannot be replayed with one probe")
    proj = projs[0]
    x, wnode, fused, d_in, rows, stored_transposed = projection(gm, proj)
    # Nodes on a path proj -> q.
    on_path = {proj}
    order = [n for n in gm.graph.nodes if n in seen or n is proj]
    for n in order:
        if n is not proj and any(a in on_path for a in n.all_input_nodes):
            on_path.add(n)
    nodes = [n for n in order if n in on_path and n is not proj]
    for n in nodes:
        if n.op != "call_function" or (isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable):
            raise Skip(f"the query chain contains `{n.target}`, which cannot be replayed")
        if is_random(n):
            raise Skip("the query chain is random (dropout); it cannot be replayed")
    prefix = []
    for n in nodes:
        if n.target in INDEX_OPS and all(a is proj or a in prefix or a not in on_path for a in n.all_input_nodes):
            prefix.append(n)
    chain = QueryChain(proj=proj, x=x, weight=wnode.target, in_features=d_in, fused_width=fused,
                       nodes=nodes, prefix=prefix, q=q, weight_rows=rows, weight_transposed=stored_transposed)
    chain.description = _describe(gm, chain)
    return chain


def locate_query_block(chain: QueryChain, values: dict) -> None:
    """Fill ``features``: push the feature index through the index-only ops after the projection."""
    marker = torch.arange(chain.fused_width, dtype=torch.float64).expand(*values[chain.proj].shape).contiguous()
    env = {chain.proj: marker}

    def arg(a):
        if isinstance(a, fx.Node):
            return env[a] if a in env else values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(arg(b) for b in a)
        return a

    for n in chain.prefix:
        env[n] = n.target(*arg(list(n.args)), **{k: arg(v) for k, v in n.kwargs.items()})
    boundary = [n for n in [chain.proj, *chain.prefix]
                if n is chain.q or any(u in chain.nodes and u not in chain.prefix for u in n.users)]
    feats = torch.cat([env[n].reshape(-1) for n in boundary if isinstance(env[n], torch.Tensor)]).unique()
    chain.features = [int(f) for f in feats.tolist()]


def place_probe(gm: fx.GraphModule, chain: QueryChain, r: fx.Node, probe_path: str) -> fx.Node:
    """Put the probe's output ``r`` (``[..., out_features]``) at the q features of the fused
    width, zeros elsewhere, so the chain's own split/select ops pick it out: a zero pad for a
    contiguous block, else a gather through a constant index (a non-persistent buffer
    ``<probe_path>.fused_index``: ``fused_index[j]`` is the row of ``r`` for fused feature ``j``, or
    ``out_features`` for the zero column). Inserted at the graph's current insertion point."""
    graph, n, width = gm.graph, chain.out_features, chain.fused_width
    if n == width:
        return r
    if chain.offset is not None:
        return graph.call_function(aten.constant_pad_nd.default, (r, [chain.offset, width - chain.offset - n]))
    index = torch.full((width,), n, dtype=torch.long)
    index[torch.tensor(chain.features)] = torch.arange(n)
    probe = gm.get_submodule(probe_path)
    probe.register_buffer("fused_index", index.to(probe.weight.device), persistent=False)
    padded = graph.call_function(aten.constant_pad_nd.default, (r, [0, 1]))
    return graph.call_function(aten.index_select.default, (padded, -1, graph.get_attr(f"{probe_path}.fused_index")))


def is_scalar_scale(gm, n: fx.Node, chain_nodes) -> bool:
    """``a * c`` or ``a / c`` with ``a`` on the chain and ``c`` a number (a folded softmax scale)."""
    if n.target not in MULS | DIVS:
        return False
    a, b = n.args[0], n.args[1]
    if n.target in MULS and not (isinstance(a, fx.Node) and (a in chain_nodes)):
        a, b = b, a
    return isinstance(a, fx.Node) and not isinstance(b, fx.Node) and const_value(gm, b) is not None


def replay(gm: fx.GraphModule, chain: QueryChain, probe_out: fx.Node) -> fx.Node:
    """Copy the chain with ``probe_out`` (``linear(x, W_R)``, padded to the fused width) in place of
    the projection; insert at the graph's current insertion point. Returns the node for ``r``."""
    graph = gm.graph
    env = {chain.proj: probe_out}
    members = set(chain.nodes) | {chain.proj}
    for n in chain.nodes:
        if is_scalar_scale(gm, n, members):
            src = n.args[0] if n.args[0] in members else n.args[1]
            env[n] = env[src]
            continue
        env[n] = graph.node_copy(n, lambda a: env.get(a, a))
    return env[chain.q]


def dropped_scale(gm, chain: QueryChain) -> float:
    """The product of the plain-number scales on the chain that :func:`replay` leaves out (OPT's
    ``q_proj(x) * scaling``): ``q = dropped_scale * chain(W_Q x)``; 1.0 when there is none."""
    members, scale = set(chain.nodes) | {chain.proj}, 1.0
    for n in chain.nodes:
        if is_scalar_scale(gm, n, members):
            c = const_value(gm, n.args[1] if n.args[0] in members else n.args[0])
            scale = scale * c if n.target in MULS else scale / c
    return scale


def _describe(gm, chain: QueryChain) -> list[str]:
    w = chain.weight.rsplit(".", 2)
    name = w[-2] if len(w) >= 2 else chain.weight
    out = [f"{chain.proj.target.__name__.split('.')[0]}({name})"]
    targets = {n.target for n in chain.nodes}
    if targets & INDEX_OPS:
        out.append("reshape")
    if targets & NORM_OPS or aten.rsqrt.default in targets:
        out.append("norm")
    if aten.cat.default in targets and aten.neg.default in targets:
        out.append("rotary")
    if any(is_scalar_scale(gm, n, set(chain.nodes) | {chain.proj}) for n in chain.nodes):
        out.append("scale (not replayed)")
    if targets & CASTS:
        out.append("cast")
    return out
