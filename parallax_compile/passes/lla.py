"""Match Local Linear Attention (LLA) sites in an ATen graph (SPEC section 2; LLA paper, FlashLLA).

An LLA site is recognised by the *class* of what it computes, not by one spelling: softmax
attention's weights feeding weighted statistics of the keys (``mu_k``, the second moment /
covariance ``C_kk``; written as ``s @ k``, ``s @ (k k^T).flatten``, ``einsum``, outer products or
centred ``k - mu_k``), a per-query ``D x D`` ridge system ``(C_kk + lambda I) rho = mu_k - q``
solved by any of the solvers below, and an output ``o = mu_v - C_vk rho`` (the intercept of the
local linear fit) where every value of the site meets. Matching reads the graph only (the
solver, ``lambda``, the loop's iteration count); whether that LLA really reproduces the site is
confirmed numerically in float64 at conversion (:mod:`parallax_compile.calibrate`), so a
candidate with this structure that computes something else is refused there with the reason.

Catalogue of LLA forms (``site.form``; the README's "Local Linear Attention" section has the table):

1. ``lla-solve``: ``torch.linalg.solve(C + lambda I, b)`` -- the textbook normal equations (the
   built-in ``lla`` model); ``lla-solve_ex``: ``torch.linalg.solve_ex`` (checked solves).
2. ``lla-cholesky``: ``torch.linalg.cholesky`` + ``torch.cholesky_solve`` (or ``cholesky_inverse``)
   -- numerically careful code for a symmetric positive definite system;
   ``lla-triangular``: the Cholesky factor and two ``linalg.solve_triangular`` /
   ``triangular_solve`` calls (the same, written out).
3. ``lla-inv``: ``torch.linalg.inv(C + lambda I) @ b`` (``inverse`` too) -- quick prototypes.
4. ``lla-lu``: ``torch.linalg.lu_factor`` + ``lu_solve`` (``lu_factor_ex``, ``torch.lu_solve``) --
   code ported from LAPACK-style solvers.
5. ``lla-cg``: a conjugate-gradient loop with a fixed iteration count, unrolled by
   ``torch.export`` (FlashLLA; ``C p + lambda p`` or ``(C + lambda I) p``): one ``D x D`` matrix
   used as the left operand of two or more ``matmul`` nodes, with inner products (``sum``)
   between them; ``cg_iterations`` = how many products.
6. ``lla-jacobi`` / ``lla-richardson``: stationary iterations unrolled the same way (no inner
   products): ``x <- x + (b - A x) / diag(A)`` (Jacobi, ``A.diagonal()`` in the graph) or
   ``x <- x + omega (b - A x)`` (Richardson; ``omega`` read from the graph), from ``x = 0``.

``torch.linalg.lstsq`` has no meta kernel, so ``torch.export`` cannot capture it at all
(:mod:`.capture` says so in one line, with the workaround). The ridge ``lambda`` is read from
``C + c * eye(D)`` (also ``eye * c``, ``add(C, eye, alpha=c)``, ``diag_embed(full(c))``, an
in-place ``diagonal().add_(c)``), or from ``C @ p + c * p`` in every CG step.

The site's output is the node where all of the site's internal values meet: the first node after
the solve whose ancestors below the softmax use nothing outside them (a post-dominator of the
softmax). The scale, mask, q/k/v and GQA unwrapping come from the softmax matcher's helpers, so
an LLA site is an :class:`AttentionSite` like any other, with ``ridge`` set.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .graph_ops import same_shape
from .match import (
    CASTS,
    DIVS,
    MULS,
    SOFTMAX,
    SUBS,
    NoMatch,
    Skip,
    _einsum_parts,
    _site,
    _strip_scalar_scale,
    _untranspose,
    _walk_logits,
    const_value,
    shape_of,
)
from .site import AttentionSite, owner_path

aten = torch.ops.aten

# Direct solvers: target -> (form, index of the argument holding the system matrix or its factor).
DIRECT = {
    aten.linalg_solve.default: ("lla-solve", 0),
    aten._linalg_solve_ex.default: ("lla-solve_ex", 0),
    aten.linalg_solve_ex.default: ("lla-solve_ex", 0),
    aten.cholesky_solve.default: ("lla-cholesky", 1),
    aten.cholesky_inverse.default: ("lla-cholesky", 0),
    aten.linalg_solve_triangular.default: ("lla-triangular", 0),
    aten.triangular_solve.default: ("lla-triangular", 1),
    aten.linalg_inv.default: ("lla-inv", 0),
    aten.linalg_inv_ex.default: ("lla-inv", 0),
    aten.inverse.default: ("lla-inv", 0),
    aten.linalg_lu_solve.default: ("lla-lu", 0),
    aten.lu_solve.default: ("lla-lu", 1),
}
FACTORIZATIONS = {
    aten.linalg_cholesky.default, aten.linalg_cholesky_ex.default, aten.cholesky.default,
    aten.linalg_lu_factor.default, aten.linalg_lu_factor_ex.default, aten.linalg_lu.default,
}
VIEWS = {aten.transpose.int, aten.t.default, aten.permute.default, aten.mT.default, aten.mH.default,
         aten.adjoint.default, aten.conj.default, operator.getitem}
EYES = {aten.eye.default, aten.eye.m}
ADDS = {aten.add.Tensor}
SQUEEZES = {aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}
REDUCTIONS = {aten.sum.dim_IntList, aten.sum.default, aten.linalg_vecdot.default, aten.einsum.default}

__all__ = ["find_lla_sites"]


def _strip(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in CASTS:
        node = node.args[0]
    return node


def _scaled_eye(gm, node) -> float | None:
    """``c`` when ``node`` is ``c * eye(D)`` (mul either side, div, casts, unsqueeze/expand) or
    ``diag_embed(full(c))``."""
    node = _strip(node)
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in EYES:
        return 1.0
    if node.target is aten.diag_embed.default:
        return const_value(gm, node.args[0])
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
    """``lambda`` when ``m = C + lambda * eye(D)`` (or ``C.diagonal().add_(lambda)``, functionalised
    by export into ``diagonal_scatter(C, diagonal(C) + lambda)``)."""
    m = _strip(m)
    if not isinstance(m, fx.Node) or m.op != "call_function":
        return None
    if m.target in ADDS:
        for side in m.args[:2]:
            c = _scaled_eye(gm, side)
            if c is not None:
                return c * float(m.kwargs.get("alpha", 1)) if side is m.args[1] else c
    if m.target is aten.diagonal_scatter.default:
        src = _strip(m.args[1])
        if isinstance(src, fx.Node) and src.target in ADDS and len(src.args) > 1:
            for side, other in ((src.args[0], src.args[1]), (src.args[1], src.args[0])):
                if isinstance(side, fx.Node) and side.target is aten.diagonal.default:
                    return const_value(gm, other)
    return None


def _ridge_in_matvecs(gm, products: list[fx.Node]) -> float | None:
    """``lambda`` when every CG step computes ``C @ p + lambda * p`` (one value for all steps)."""
    found = set()
    for mm in products:
        n = _past_squeezes(mm)
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


def _past_squeezes(n: fx.Node) -> fx.Node:
    while len(n.users) == 1 and next(iter(n.users)).target in SQUEEZES | CASTS:
        n = next(iter(n.users))
    return n


def _system_matrix(node: fx.Node) -> fx.Node:
    """The matrix ``A`` a direct solver solves with: its argument, or the input of the
    factorisation (Cholesky, LU) whose factor it takes, through transposes and ``getitem``."""
    _, i = DIRECT[node.target]
    m = node.args[i]
    for _ in range(8):
        m = _strip(m)
        if not isinstance(m, fx.Node) or m.op != "call_function":
            break
        if m.target in FACTORIZATIONS:
            return m.args[0]
        if m.target not in VIEWS:
            break
        m = m.args[0]
    return m


def _iterative_form(gm, matrix: fx.Node, products: list[fx.Node], order) -> tuple[str, float | None]:
    """``("lla-cg", None)``, ``("lla-jacobi", None)`` or ``("lla-richardson", omega)`` for a square
    matrix reused by ``products`` (an unrolled loop), told apart by what the loop computes between
    its products: inner products (CG), a division by ``diag(A)`` (Jacobi), a constant step (Richardson)."""
    first, last = min(products, key=order.get), max(products, key=order.get)
    between = [n for n in _descendants(first) if order[n] < order[last]]
    if any(n.target in REDUCTIONS for n in between):
        return "lla-cg", None
    if any(u.target is aten.diagonal.default for u in matrix.users):
        return "lla-jacobi", None
    omegas = set()
    for mm in products:
        subs = [u for u in _past_squeezes(mm).users if u.target in SUBS]
        steps = [u for sub in subs for u in sub.users if u.target in MULS]
        cs = {c for u in steps for c in (const_value(gm, u.args[0]), const_value(gm, u.args[1]))
              if c is not None}
        if len(cs) != 1:
            raise Skip("an unrolled loop over a D x D matrix, but neither CG (inner products), Jacobi "
                       "(diag(A)) nor Richardson with a constant step `x + omega (b - A x)`")
        omegas |= cs
    if len(omegas) != 1:
        raise Skip("Richardson-like loop whose step omega changes between iterations")
    return "lla-richardson", omegas.pop()


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


def _output_node(sm: fx.Node, anchor: fx.Node, mu_v: fx.Node, order: dict[fx.Node, int], dead) -> fx.Node:
    """The first node after ``anchor`` shaped like ``mu_v`` through which every (live) use of the
    softmax's descendants leaves the site."""
    below = _descendants(sm) - dead
    want = shape_of(mu_v)
    for cand in sorted((n for n in below if order[n] > order[anchor]), key=order.get):
        if not same_shape(shape_of(cand), want):
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


def _weighted_sums(sm: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """``(product, X)`` for each ``weights @ X`` use of the softmax (``matmul``/``bmm``, or a
    two-operand ``einsum`` contracting the key dim)."""
    out = []
    for u in sm.users:
        if u.target in (aten.matmul.default, aten.bmm.default) and u.args[0] is sm:
            out.append((u, u.args[1]))
        elif u.target is aten.einsum.default:
            (subs, o_sub, ops) = _einsum_parts(u)
            if len(ops) == 2 and ops[0] is sm and len(subs[0]) >= 2 and subs[0][-1] not in o_sub \
                    and subs[0][-1] in subs[1]:
                out.append((u, ops[1]))
    return out


def _match(gm, anchor: fx.Node, matrix: fx.Node, form: str, iterations: int | None,
           products: list[fx.Node], order, dead) -> AttentionSite:
    sm = _own_softmax(matrix, order)
    if sm is None or sm is matrix:
        raise NoMatch("no softmax feeds the matrix")
    omega = None
    if form == "lla-loop":
        form, omega = _iterative_form(gm, matrix, products, order)
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
    # weights @ X: X = k (mu_k), X built from k (second moment), else v (mu_v).
    near_k = lambda x: k in _ancestors_until(x, 12)  # noqa: E731
    sums = _weighted_sums(sm)
    if not any(x is k for _, x in sums) or k not in _ancestors_until(matrix, 4000):
        raise NoMatch("the weights do not give weighted statistics of the keys")
    pvs = [(u, x) for u, x in sums if not near_k(x)]
    if len(pvs) != 1:
        raise Skip(f"{form}: expected one weights @ v product, found {len(pvs)}")
    mu_v, v = pvs[0]
    out = _output_node(sm, anchor, mu_v, order, dead)
    site = _site(sm, form, q=q, k=k, v=v, out=out, scale=scale, causal=False, terms=terms,
                 k_transposed=k_transposed, extra={"softmax": sm, "lla_anchor": anchor, "lla_omega": omega})
    site.ridge, site.cg_iterations = ridge, iterations
    return site


def find_lla_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every LLA site of ``gm`` (matched, or skipped with a reason), in graph order of their softmax.
    ``site.nodes["softmax"]`` is the softmax the site owns (the softmax matcher leaves it alone);
    ``site.nodes["lla_omega"]`` is Richardson's step (``lla-richardson`` only). ``site.cg_iterations``
    counts the iterations of an unrolled loop (CG, Jacobi or Richardson)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    dead = _dead(gm)
    sites, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in DIRECT:
            anchor, matrix, iters, products = node, _system_matrix(node), None, []
            form = DIRECT[node.target][0]
        else:
            shp = shape_of(node)
            if node in seen or shp is None or len(shp) < 3 or not _square(shp):
                continue
            products = [u for u in node.users if u.target is aten.matmul.default and u.args[0] is node]
            if len(products) < 2:
                continue
            matrix, form, iters = node, "lla-loop", len(products)
            anchor = max(products, key=order.get)
        seen.add(matrix)
        try:
            site = _match(gm, anchor, matrix, form, iters, products, order, dead)
        except NoMatch:
            continue
        except Skip as why:
            if form == "lla-loop":
                # A square matrix reused by products is a weak signal (unlike a solve): not an LLA
                # site unless it matches fully; the softmax matcher reports its softmax, if any.
                continue
            site = AttentionSite(module_path=owner_path(node), form=form)
            site.nodes = {"out": node, "softmax": _own_softmax(matrix, order)}
            site.skip(str(why))
        if any(s.nodes.get("softmax") is site.nodes.get("softmax") for s in sites if site.nodes.get("softmax")):
            continue  # a CG matrix and its solve of the same site; two triangular solves of one site
        sites.append(site)
    return sites
