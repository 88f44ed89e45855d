"""The query chain: from the block input ``x`` through the query projection, reshapes, per-head
norm and rotary embedding to ``q``; and its replay with the probe ``W_R`` in place of ``W_Q``.

SPEC section 5: ``r`` goes through the same reshape, rotary embedding and per-head norm as ``q``,
but never through the softmax temperature. The replay therefore copies every node between the
projection and ``q``, except multiplications/divisions by a plain number (a scale folded into
the chain, as OPT and Whisper do), with the projection replaced by ``linear(x, W_R)``.

Fused projections (GPT-2's ``c_attn``, ``nn.MultiheadAttention``'s ``in_proj``) produce q, k
and v together; ``W_R`` is shaped like the **query block** only. Which output features feed ``q``
is found by pushing a marker (the feature index) through the index-only ops after the
projection; the probe's output is zero-padded to the fused width so the same split/select ops
pick it out again.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from .match import CASTS, DIVS, MULS, Skip, const_value

aten = torch.ops.aten

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
    offset: int = 0
    out_features: int = 0
    """Rows of ``W_R``: the features of the query block."""
    description: list[str] = field(default_factory=list)

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


def projection(gm, n: fx.Node):
    """``(x, weight_node, out_features, in_features)`` when ``n`` applies a parameter weight to ``x``."""
    if n.op != "call_function":
        return None
    if n.target is aten.linear.default:
        w = _param(gm, n.args[1])
        if w is not None and w.dim() == 2:
            return n.args[0], n.args[1], w.shape[0], w.shape[1]
        return None
    if n.target in (aten.addmm.default, aten.mm.default, aten.matmul.default):
        x, wn = (n.args[1], n.args[2]) if n.target is aten.addmm.default else (n.args[0], n.args[1])
        transposed = isinstance(wn, fx.Node) and wn.op == "call_function" and wn.target in (aten.t.default, aten.transpose.int)
        w = _param(gm, wn.args[0] if transposed else wn)
        if w is None or w.dim() != 2:
            return None
        f, d = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        return x, (wn.args[0] if transposed else wn), f, d
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
    x, wnode, fused, d_in = projection(gm, proj)
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
        if n.target in (aten.dropout.default, aten.native_dropout.default, aten.bernoulli.default, aten.rand_like.default):
            raise Skip("the query chain is random (dropout); it cannot be replayed")
    prefix = []
    for n in nodes:
        if n.target in INDEX_OPS and all(a is proj or a in prefix or a not in on_path for a in n.all_input_nodes):
            prefix.append(n)
    chain = QueryChain(proj=proj, x=x, weight=wnode.target, in_features=d_in, fused_width=fused,
                       nodes=nodes, prefix=prefix, q=q)
    chain.description = _describe(gm, chain)
    return chain


def locate_query_block(chain: QueryChain, values: dict) -> None:
    """Fill ``offset`` / ``out_features``: push the feature index through the index-only ops."""
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
    lo, hi = int(feats.min()), int(feats.max())
    if feats.numel() != hi - lo + 1:
        raise Skip("q takes a non-contiguous set of the projection's outputs")
    chain.offset, chain.out_features = lo, hi - lo + 1


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
