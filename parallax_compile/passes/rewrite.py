"""Rewrite: replace one matched site by ``torch.ops.parallax.attention`` with a new probe ``W_R``.

The probe is an ``nn.Linear(in_features, query features, bias=False)`` registered as
``<owning module>.r_proj`` (initialised at random like ``W_Q``) and a per-head gain
``<owning module>.r_gain`` ``[Hq]`` initialised to zero, applied after the replayed query chain
(:mod:`parallax_compile.probes`, SPEC section 7), so the rewritten model computes exactly what it
did before (SPEC section 2: ``r = 0`` gives softmax attention) and a step on the gain changes it
in proportion to the step.
"""

from __future__ import annotations

import math
import operator
from functools import reduce

import torch
from torch import fx

from ..probes import gain_name, init_probe_weight, new_gain
from .graph_ops import same_shape
from .match import needs_logits, shape_of, val
from .query_chain import QueryChain, place_probe, replay
from .site import AttentionSite

aten = torch.ops.aten


def _fetch(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def probe_path(gm: fx.GraphModule, owner: str, taken: set[str]) -> str:
    """``<owner>.r_proj`` (``r_proj_1``... when taken)."""
    base = f"{owner}.r_proj" if owner else "r_proj"
    path, i = base, 0
    while path in taken or _exists(gm, path):
        i += 1
        path = f"{base}_{i}"
    taken.add(path)
    return path


def gain_path(probe: str) -> str:
    """``<owner>.r_proj[_N]`` -> ``<owner>.r_gain[_N]``."""
    owner, _, attr = probe.rpartition(".")
    return f"{owner}.{gain_name(attr)}" if owner else gain_name(attr)


def remove_probe(gm: fx.GraphModule, path: str) -> None:
    """Delete the probe ``path``, its gate and its gain from ``gm`` (a reverted site)."""
    gm.delete_submodule(path)
    gm.delete_submodule(path + "_gate")
    owner, _, attr = gain_path(path).rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if attr in mod._parameters:
        del mod._parameters[attr]


def _heads(site: AttentionSite, q: fx.Node) -> int:
    shape = shape_of(q) or ()
    if len(shape) == 4 and isinstance(shape[1], int):
        return shape[1]
    return site.num_heads if isinstance(site.num_heads, int) and site.num_heads > 0 else 1


def _exists(gm, path):
    try:
        _fetch(gm, path)
        return True
    except AttributeError:
        return False


def _call(graph, target, *args, **kwargs):
    return graph.call_function(target, tuple(args), kwargs)


def _dim_size(graph, node, dim):
    size = shape_of(node)[dim]
    return size if isinstance(size, int) else _call(graph, aten.sym_size.int, node, dim % len(shape_of(node)))


def _to_product_layout(graph, node, scores, product):
    """A term laid out like the reshaped ``scores``, broadcast and reshaped like ``product``."""
    sizes = lambda n: [_dim_size(graph, n, d) for d in range(len(shape_of(n)))]  # noqa: E731
    return _call(graph, aten.reshape.default, _call(graph, aten.expand.default, node, sizes(scores)), sizes(product))


def build_mask(graph: fx.Graph, site: AttentionSite, q: fx.Node, k: fx.Node) -> fx.Node | None:
    """Emit the mask the op receives: boolean when every term is boolean, additive otherwise
    (``where(keep, sum of additive terms, -inf)`` when both kinds are present). Exact for -inf
    fills and additions in any order (``-inf + finite = -inf``); a ``"set"`` term (finite fill) has
    no such mask: :func:`rewrite_site` passes the original logits instead."""
    keeps, adds = [], []
    rank = site.nodes["rank"]
    for t in site.mask_terms:
        node = t.node
        if node == "causal_top_left":
            lq, lk = _dim_size(graph, q, -2), _dim_size(graph, k, -2)
            ones = _call(graph, aten.ones.default, [lq, lk], dtype=torch.bool, device=val(q).device)
            keeps.append(_call(graph, aten.tril.default, ones))
            continue
        if t.scores is not None:
            node = _to_product_layout(graph, node, t.scores, site.nodes["scores"])
            if rank == 3:
                node = _call(graph, aten.unsqueeze.default, node, 0)
        elif rank == 3 and len(shape_of(node) or ()) == 3:
            node = _call(graph, aten.unsqueeze.default, node, 0)
        if t.kind == "keep":
            keeps.append(node)
        elif t.kind == "drop":
            keeps.append(_call(graph, aten.logical_not.default, node))
        elif t.kind == "add":
            is_bool = val(t.node) is not None and val(t.node).dtype == torch.bool
            if is_bool or t.coef != 1.0:
                node = _call(graph, aten.mul.Tensor, node, t.coef)
            adds.append(node)
        else:
            raise ValueError(f"build_mask: a {t.kind!r} mask term has no mask form (use the original logits)")
    keep = reduce(lambda a, b: _call(graph, aten.logical_and.default, a, b), keeps) if keeps else None
    add = reduce(lambda a, b: _call(graph, aten.add.Tensor, a, b), adds) if adds else None
    if keep is not None and add is not None:
        return _call(graph, aten.where.ScalarOther, keep, add, -math.inf)
    return keep if keep is not None else add


def _gain(graph: fx.Graph, r: fx.Node, path: str, heads: int, rank: int, dtype: torch.dtype) -> fx.Node:
    """``r`` times the per-head gain (:func:`parallax_compile.probes.apply_gain` as ATen nodes);
    ``dtype``: the gain's."""
    g = graph.get_attr(path)
    if val(r) is not None and val(r).dtype != dtype:
        g = _call(graph, aten.to.dtype, g, val(r).dtype)
    if heads > 1 and rank == 4:
        return _call(graph, aten.mul.Tensor, r, _call(graph, aten.view.default, g, [heads, 1, 1]))
    if heads > 1:  # [B * H, L, D], batch-major
        r4 = _call(graph, aten.unflatten.int, r, 0, [-1, heads])
        r4 = _call(graph, aten.mul.Tensor, r4, _call(graph, aten.view.default, g, [heads, 1, 1]))
        return _call(graph, aten.flatten.using_ints, r4, 0, 1)
    return _call(graph, aten.mul.Tensor, r, _call(graph, aten.view.default, g, []))


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, chain: QueryChain, path: str,
                 probe: str = "linear") -> dict[str, fx.Node]:
    """Insert the probe, the replayed chain and the op before the site's output; reroute its users.
    Returns the new nodes (``r``, ``out``) so the caller can verify them.

    ``probe="gated"`` (the paper's gated ablation): ``r = sigmoid(w_g . x) * W_R x`` with one gate
    per query head, ``w_g`` an ``nn.Linear(in_features, num_heads, bias=False)`` registered as
    ``<path>_gate`` and initialised to zero (gate 0.5; ``W_R = 0`` still gives ``r = 0``). Needs
    the query block to be ``num_heads`` contiguous groups of features; otherwise the plain probe
    is used and ``site.probe`` names no gate."""
    graph = gm.graph
    out = site.nodes["out"]
    w_q = _fetch(gm, chain.weight)
    w_r = torch.nn.Linear(chain.in_features, chain.out_features, bias=False, device=w_q.device, dtype=w_q.dtype)
    init_probe_weight(w_r.weight, chain.query_weight(w_q).detach())
    gm.add_submodule(path, w_r)
    heads = _heads(site, site.nodes["q"])
    g_owner, _, g_attr = gain_path(path).rpartition(".")
    (gm.get_submodule(g_owner) if g_owner else gm).register_parameter(g_attr, new_gain(heads, w_q))
    with graph.inserting_before(out):
        w = graph.get_attr(f"{path}.weight")
        r = _call(graph, aten.linear.default, chain.x, w)
        g_heads = site.num_heads
        if probe == "gated" and isinstance(g_heads, int) and g_heads > 0 and chain.out_features % g_heads == 0:
            gate = torch.nn.Linear(chain.in_features, g_heads, bias=False, device=w_q.device, dtype=w_q.dtype)
            torch.nn.init.zeros_(gate.weight)
            gm.add_submodule(f"{path}_gate", gate)
            g = _call(graph, aten.sigmoid.default,
                      _call(graph, aten.linear.default, chain.x, graph.get_attr(f"{path}_gate.weight")))
            r = _call(graph, aten.unflatten.int, r, -1, [g_heads, chain.out_features // g_heads])
            r = _call(graph, aten.flatten.using_ints, _call(graph, aten.mul.Tensor, r, _call(
                graph, aten.unsqueeze.default, g, -1)), -2)
        r = replay(gm, chain, place_probe(gm, chain, r, path))
        r = _gain(graph, r, gain_path(path), heads, site.nodes["rank"], w_q.dtype)
        q, k, v = site.nodes["q"], site.nodes["k"], site.nodes["v"]
        if site.nodes["k_transposed"]:
            k = _call(graph, aten.transpose.int, k, -2, -1)
        dtype = val(q).dtype
        k_in, v_in = k, v
        if val(k_in) is not None and val(k_in).dtype != dtype:
            k = _call(graph, aten.to.dtype, k, dtype)
        if val(v_in) is not None and val(v_in).dtype != dtype:
            v = _call(graph, aten.to.dtype, v, dtype)
        scale, causal = site.scale, site.causal
        if needs_logits(site.mask_terms):
            # A finite fill *sets* logits: the op gets the original logits as its additive mask and
            # q = 0, so its weights are softmax(original logits) exactly, and g = r . k as always.
            mask, scale, causal = site.nodes["logits"], 1.0, False
            product = site.nodes.get("scores")
            # Logits of reshaped scores (Bloom).
            if product is not None and not same_shape(shape_of(mask), shape_of(product)):
                mask = _to_product_layout(graph, mask, mask, product)
            q = _call(graph, aten.zeros_like.default, q)
            if site.nodes["rank"] == 3:
                mask = _call(graph, aten.unsqueeze.default, mask, 0)
        else:
            mask = build_mask(graph, site, q, k_in)
        if site.nodes["rank"] == 3:
            q, r, k, v = (_call(graph, aten.unsqueeze.default, t, 0) for t in (q, r, k, v))
        op = _call(graph, torch.ops.parallax.attention.default, q, r, k, v, mask, scale, causal, None)
        o = _call(graph, operator.getitem, op, 0)
        if mask is not None and site.nodes.get("empty_rows") == "nan":
            # softmax over a row of -inf logits is NaN where the op gives 0: reproduce it.
            is_bool = not needs_logits(site.mask_terms) and all(t.kind != "add" for t in site.mask_terms)
            live = mask if is_bool else _call(graph, aten.gt.Scalar, mask, -math.inf)
            live = _call(graph, aten.any.dim, live, -1, True)
            o = _call(graph, aten.where.ScalarOther, live, o, math.nan)
        if site.nodes["rank"] == 3:
            o = _call(graph, aten.squeeze.dim, o, 0)
        out_dtype = val(out).dtype if val(out) is not None else dtype
        if out_dtype != dtype:
            o = _call(graph, aten.to.dtype, o, out_dtype)
    out.replace_all_uses_with(o)
    return {"r": r, "out": o}


def drop_dead_code(graph: fx.Graph) -> None:
    """Dead-code elimination that also drops unused random ops. ``Graph.eliminate_dead_code`` keeps
    nodes tagged nondeterministic, so after a rewrite the replaced attention (its ``q k^T``, softmax
    and an eval-mode ``dropout(p, train=False)`` or an SDPA node) stayed in the graph and still ran
    every call. A dead random op has no effect on any output; only mutating ops are kept."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
