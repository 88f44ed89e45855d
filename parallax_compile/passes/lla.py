"""Match Local Linear Attention (LLA) sites in an ATen graph (SPEC section 2; LLA paper, FlashLLA).

An LLA site is softmax attention's weights feeding weighted key statistics (``mu_k``,
``C_kk = E_s[k k^T] - mu_k mu_k^T``), a per-query ``D x D`` system ``(C_kk + lambda I) rho = mu_k - q``
solved either by

1. ``torch.linalg.solve`` (``aten.linalg_solve``) -> form ``lla-solve``, or
2. a conjugate-gradient loop with a fixed iteration count, unrolled by ``torch.export``: one
   ``D x D`` matrix used as the left operand of two or more ``matmul`` nodes -> form ``lla-cg``
   (``cg_iterations`` = how many),

and an output ``o = mu_v - C_vk rho`` (the intercept of the local linear fit). The ridge ``lambda``
is read from the graph: ``C + c * eye(D)`` (solve or CG), or ``C @ p + c * p`` in every CG step.

The site's output is the node where all of the site's internal values meet: the first node after
the solve whose ancestors below the softmax use nothing outside them (a post-dominator of the
softmax). The scale, mask, q/k/v and GQA unwrapping come from the softmax matcher's helpers, so
an LLA site is an :class:`AttentionSite` like any other, with ``ridge`` set. Matching only reads
the graph; whether the recognised ``lambda`` really reproduces the site is checked numerically at
conversion (:mod:`parallax_compile.calibrate`).
"""

from __future__ import annotations

import torch
from torch import fx

from .match import (
    CASTS,
    DIVS,
    MULS,
    PRODUCTS,
    SOFTMAX,
    NoMatch,
    Skip,
    _site,
    _strip_scalar_scale,
    _untranspose,
    _walk_logits,
    const_value,
    shape_of,
)
from .site import AttentionSite, owner_path

aten = torch.ops.aten

SOLVES = {aten.linalg_solve.default, aten._linalg_solve_ex.default, aten.linalg_solve_ex.default}
EYES = {aten.eye.default, aten.eye.m}
ADDS = {aten.add.Tensor}
SQUEEZES = {aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}

__all__ = ["find_lla_sites"]


def _strip(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in CASTS:
        node = node.args[0]
    return node


def _scaled_eye(gm, node) -> float | None:
    """``c`` when ``node`` is ``c * eye(D)`` (mul either side, div, casts, unsqueeze/expand)."""
    node = _strip(node)
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in EYES:
        return 1.0
    if node.target in (aten.unsqueeze.default, aten.expand.default):
        return _scaled_eye(gm, node.args[0])
    if node.target in MULS:
        for a, b in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            inner, c = _scaled_eye(gm, a), const_value(gm, b)
            if inner is not None and c is not None:
                return inner * c
    if node.target in DIVS:
        inner, c = _scaled_eye(gm, node.args[0]), const_value(gm, node.args[1])
        if inner is not None and c:
            return inner / c
    return None


def _ridge_in_matrix(gm, m) -> float | None:
    """``lambda`` when ``m = C + lambda * eye(D)``."""
    m = _strip(m)
    if isinstance(m, fx.Node) and m.op == "call_function" and m.target in ADDS:
        for side in m.args[:2]:
            c = _scaled_eye(gm, side)
            if c is not None:
                return c * float(m.kwargs.get("alpha", 1)) if side is m.args[1] else c
    return None


def _ridge_in_matvecs(gm, products: list[fx.Node]) -> float | None:
    """``lambda`` when every CG step computes ``C @ p + lambda * p`` (one value for all steps)."""
    found = set()
    for mm in products:
        n = mm
        while len(n.users) == 1 and next(iter(n.users)).target in SQUEEZES | CASTS:
            n = next(iter(n.users))
        adds = [u for u in n.users if u.target in ADDS]
        if len(adds) != 1:
            return None
        other = adds[0].args[1] if adds[0].args[0] is n else adds[0].args[0]
        other = _strip(other)
        if not (isinstance(other, fx.Node) and other.target in MULS):
            return None
        c = const_value(gm, other.args[1])
        if c is None:
            c = const_value(gm, other.args[0])
        if c is None:
            return None
        found.add(c)
    return found.pop() if len(found) == 1 else None


def _ancestors_until(node: fx.Node, limit: int = 400) -> list[fx.Node]:
    seen, todo, order = set(), [node], []
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        order.append(n)
        todo.extend(n.all_input_nodes)
    return order


def _own_softmax(matrix: fx.Node, order) -> fx.Node | None:
    """The latest softmax above ``matrix`` (earlier layers' softmaxes are above it too)."""
    sms = [n for n in _ancestors_until(matrix, 4000) if n.op == "call_function" and n.target in SOFTMAX]
    return max(sms, key=order.get) if sms else None


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return seen


def _dead(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose values reach no output (e.g. the unused last direction of an unrolled CG loop)."""
    dead: set[fx.Node] = set()
    for n in reversed(gm.graph.nodes):
        if n.op in ("call_function", "get_attr") and all(u in dead for u in n.users):
            dead.add(n)
    return dead


def _square(shp) -> bool:
    """``[.., n, n]`` with ``n`` static. Compares ints only: comparing a symbolic length with a
    static size installs a guard that pins the length (L == head_dim would become static)."""
    return isinstance(shp[-1], int) and isinstance(shp[-2], int) and shp[-1] == shp[-2]


def _same_shape(a, b) -> bool:
    """Shape equality without guards on symbolic dims (compared by expression)."""
    return a is not None and b is not None and len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _output_node(sm: fx.Node, anchor: fx.Node, mu_v: fx.Node, order: dict[fx.Node, int], dead) -> fx.Node:
    """The first node after ``anchor`` shaped like ``mu_v`` through which every (live) use of the
    softmax's descendants leaves the site."""
    below = _descendants(sm) - dead
    want = shape_of(mu_v)
    for cand in sorted((n for n in below if order[n] > order[anchor]), key=order.get):
        if not _same_shape(shape_of(cand), want):
            continue
        region, todo = set(), [cand]
        while todo:
            n = todo.pop()
            if n in region or n not in below:
                continue
            region.add(n)
            todo.extend(n.all_input_nodes)
        if anchor not in region or mu_v not in region:
            continue
        if all(u in region or u in dead for n in region if n is not cand for u in n.users):
            return cand
    raise Skip("LLA-like solve, but no single output node collects the site (its statistics are "
               "used elsewhere)")


def _match(gm, anchor: fx.Node, matrix: fx.Node, form: str, iterations: int | None,
           products: list[fx.Node], order, dead) -> AttentionSite:
    sm = _own_softmax(matrix, order)
    if sm is None or sm is matrix:
        raise NoMatch("no softmax feeds the matrix")
    ridge = _ridge_in_matrix(gm, matrix)
    if ridge is None and form == "lla-cg":
        ridge = _ridge_in_matvecs(gm, products)
    if ridge is None:
        raise Skip(f"{form}: the ridge is not a constant `lambda * I` added to the key statistics "
                   "(a learned or per-query ridge cannot be read from the graph)")
    product, scale, terms = _walk_logits(gm, sm.args[0])
    if product.target not in (aten.matmul.default, aten.bmm.default):
        raise Skip(f"{form}: QK^T written as `{product.target}`; LLA sites are matched for matmul/bmm")
    q, kt = product.args[:2]
    kt, k_scale = _strip_scalar_scale(gm, kt)
    k, k_transposed = _untranspose(kt)
    q, q_scale = _strip_scalar_scale(gm, q)
    scale *= k_scale * q_scale
    # P @ X users of the weights: X = k (mu_k), X built from k (second moment), else v (mu_v).
    near_k = lambda x: k in _ancestors_until(x, 12)
    pvs = [u for u in sm.users if u.target in PRODUCTS and u.args[0] is sm and not near_k(u.args[1])]
    if len(pvs) != 1:
        raise Skip(f"{form}: expected one weights @ v product, found {len(pvs)}")
    mu_v = pvs[0]
    out = _output_node(sm, anchor, mu_v, order, dead)
    site = _site(sm, form, q=q, k=k, v=mu_v.args[1], out=out, scale=scale, causal=False, terms=terms,
                 k_transposed=k_transposed, extra={"softmax": sm, "lla_anchor": anchor})
    site.ridge, site.cg_iterations = ridge, iterations
    return site


def find_lla_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every LLA site of ``gm`` (matched, or skipped with a reason), in graph order of their softmax.
    ``site.nodes["softmax"]`` is the softmax the site owns (the softmax matcher leaves it alone)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    dead = _dead(gm)
    sites, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SOLVES:
            anchor, matrix, form, iters, products = node, node.args[0], "lla-solve", None, []
        else:
            shp = shape_of(node)
            if node in seen or shp is None or len(shp) < 3 or not _square(shp):
                continue
            products = [u for u in node.users if u.target is aten.matmul.default and u.args[0] is node]
            if len(products) < 2:
                continue
            matrix, form, iters = node, "lla-cg", len(products)
            anchor = max(products, key=order.get)
        seen.add(matrix)
        try:
            site = _match(gm, anchor, matrix, form, iters, products, order, dead)
        except NoMatch:
            continue
        except Skip as why:
            if form == "lla-cg":
                # A square matrix reused by products is a weak signal (unlike a solve): not an LLA
                # site unless it matches fully; the softmax matcher reports its softmax, if any.
                continue
            site = AttentionSite(module_path=owner_path(node), form=form)
            site.nodes = {"out": node, "softmax": _own_softmax(matrix, order)}
            site.skip(str(why))
        if any(s.nodes.get("softmax") is site.nodes.get("softmax") for s in sites if site.nodes.get("softmax")):
            continue  # a CG matrix and its solve of the same site
        sites.append(site)
    return sites
