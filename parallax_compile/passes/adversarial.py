"""Adversarial masks for verification: the example inputs rarely hold a fully masked row or a row
that keeps a single key, where mask semantics (fill = set, add = add, an all -inf row) show.

:func:`mask_inputs` finds the graph inputs that reach the sites' masks but not q, k or v (an
``attention_mask``, a padding flag, a position bias); :func:`adversarial_variants` rewrites them
into such rows. The conversion runs each variant and compares every rewritten site with the
original attention (:func:`parallax_compile.convert.run_conversion`).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .site import AttentionSite


def _ancestors(nodes) -> set[fx.Node]:
    """Value ancestors: a size read (``sym_size``) depends on a shape, not on the values."""
    seen, todo = set(), [n for n in nodes if isinstance(n, fx.Node)]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.target is not torch.ops.aten.sym_size.int:
            todo.extend(n.all_input_nodes)
    return seen


def mask_inputs(gm: fx.GraphModule, sites: list[AttentionSite]) -> list[int]:
    """Positions (among ``gm``'s placeholders) of the tensor inputs that feed some site's mask (or
    the logits a finite fill sets) without feeding its q, k or v."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = set()
    for site in sites:
        terms = [t.node for t in site.mask_terms if isinstance(t.node, fx.Node)]
        if site.nodes.get("logits") is not None:
            terms.append(site.nodes["logits"])
        if not terms:
            continue
        qkv = _ancestors([site.nodes.get(k) for k in ("q", "k", "v")])
        found |= (_ancestors(terms) - qkv) & set(holders)
    return [i for i, n in enumerate(holders) if n in found and isinstance(n.meta.get("val"), torch.Tensor)]


def _variant(t: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """``kind``: ``"row0-off"`` / ``"row0-on"`` (the first batch element all 0 / all 1, or -inf /
    0 for an additive mask), ``"one-key"`` / ``"one-off"`` (one key per row on / off), and for
    additive masks ``"row0-min"`` (``finfo.min`` everywhere in the first batch element)."""
    if t.dim() == 0 or t.numel() == 0 or (kind == "row0-min" and not t.is_floating_point()):
        return t
    floating = t.is_floating_point()
    on, off = (0.0, -torch.inf) if floating else (1, 0)
    if kind == "row0-min" and floating:
        on, off = 0.0, torch.finfo(t.dtype).min
    out = t.clone()
    if kind in ("row0-off", "row0-min"):
        out[0] = off
    elif kind == "row0-on":
        out[0] = on
    else:
        idx = torch.randint(0, t.shape[-1], (*t.shape[:-1], 1), generator=gen)
        hot = torch.zeros(t.shape, dtype=torch.bool).scatter_(-1, idx, True).to(t.device)
        if kind == "one-off":
            hot = ~hot
        out = torch.where(hot, torch.tensor(on, dtype=t.dtype, device=t.device),
                          torch.tensor(off, dtype=t.dtype, device=t.device))
    return out


KINDS = ("row0-off", "row0-on", "one-key", "one-off", "row0-min")


def adversarial_variants(args: tuple, kwargs: dict, positions: list[int]):
    """Yield ``(label, args, kwargs)``: the inputs with every mask input at ``positions`` (indices
    into the flat inputs) rewritten by one kind of :func:`_variant` at a time."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    gen = torch.Generator().manual_seed(0)
    for kind in KINDS:
        new = list(leaves)
        for i in positions:
            if i < len(new) and isinstance(new[i], torch.Tensor):
                new[i] = _variant(new[i], kind, gen)
        if any(new[i] is not leaves[i] for i in positions if i < len(new)):
            a, k = pytree.tree_unflatten(new, spec)
            yield kind, tuple(a), dict(k)
