"""Match and rewrite Parallax written out in plain torch ops (the ATen graph a backend sees).

Research code writes Parallax from the paper instead of calling the op. Two forms are
recognised (SPEC sections 2 and 3), each with the softmax logits of :mod:`.match` (scale as a
multiply/divide, additive / ``masked_fill`` / ``where`` masks, casts), causal masks and GQA
(``repeat_kv`` / ``repeat_interleave`` on K/V):

1. **covariance** (paper eq. for Parallax; the official ``reference.py``):
   ``s = softmax(l)``, ``mu_v = s @ v``, ``mu_k = s @ k``,
   ``o = mu_v - sum_j s_ij (v_j - mu_v)((k_j - mu_k) . r)`` in any arrangement of the sums;
2. **streaming** (the fused kernel's algebra): ``o1 = p @ v``, ``g = r @ k^T``,
   ``o2 = (p * g) @ v``, ``c = rowsum(p * g)``, ``o = o1 * (1 + c) - o2``.

How a site is found: from each softmax, walk forward until every path from it meets in one
node shaped ``[B, Hq, Lq, Dv]`` (the output); collect the tensors that region reads besides the
softmax (K and V, possibly transposed or repeated, and the probe ``r``, the one other tensor
shaped like ``q``; scores such as ``r @ k^T`` are followed back to their inputs). A softmax whose
region reads no probe is plain attention and is left alone (``convert`` upgrades it).

Nothing is rewritten on structure alone. Each candidate is **verified numerically**: the
region and its replacement (the op with the mask :func:`.rewrite.build_mask` emits) run side by
side in float64 on fresh random ``q, k, v, r`` (and random masks, or the exact causal pattern
when the mask was proven causal) at the example's shapes, and the replacement is kept only when
``relative_error`` (from :mod:`..checks`) is within ``TOLERANCE`` of the graph's dtype.
A mask is turned into ``causal=True`` only when it is proven lower-triangular by structure:
``tril(ones(L, L))``, ``triu(ones, 1)`` as the dropped set, or a registered lower-triangular
buffer sliced ``[..., :L, :L]`` (nanoGPT), through ``~``, ``== 0`` and casts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..checks import relative_error
from .graph_ops import DROPOUTS, is_random, same_shape, same_size
from .match import (
    CASTS,
    PRODUCTS,
    SOFTMAX,
    NoMatch,
    Skip,
    _einsum_parts,
    _fetch,
    _strip_scalar_scale,
    _untranspose,
    _walk_logits,
    describe_mask,
    needs_logits,
    shape_of,
    unrepeat,
    val,
)
from .rewrite import build_mask
from .site import AttentionSite, MaskTerm, owner_path

aten = torch.ops.aten

__all__ = ["ParallaxSite", "find_parallax", "rewrite_parallax"]

MAX_REGION = 256  # nodes between the softmax and the output; a larger region is not one attention
VIEWS = CASTS | {aten.transpose.int, aten.permute.default, aten.t.default, aten.expand.default,
                 aten.reshape.default, aten.view.default, aten._unsafe_view.default,
                 aten.unsqueeze.default, aten.slice.Tensor, aten.repeat_interleave.self_int}
NOTS = {aten.logical_not.default, aten.bitwise_not.default}


@dataclass
class ParallaxSite:
    """One softmax of the graph looked at by the pattern pass, and what became of it."""

    module_path: str
    form: str
    """``covariance`` / ``streaming`` (hand-written Parallax), ``softmax`` (plain attention),
    ``attention`` (a softmax whose logits or region the pass cannot read)."""
    status: str = "skipped"
    """``rewritten`` or ``skipped``."""
    reason: str | None = None
    causal: bool = False
    gqa: str = "none"
    mask: str = "none"
    max_error: float | None = None
    """Relative error of the op against the hand-written region on the random check."""
    nodes: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    terms: list[MaskTerm] = field(default_factory=list, repr=False, compare=False)
    scale: float | None = None

    def skip(self, reason: str) -> ParallaxSite:
        self.status, self.reason = "skipped", reason
        return self

    def as_dict(self) -> dict[str, Any]:
        keys = ("module_path", "form", "status", "reason", "causal", "gqa", "mask", "max_error")
        return {k: getattr(self, k) for k in keys}


# --- the region after the softmax -------------------------------------------------------------


def _output_of(s: fx.Node, lq, dv_candidates) -> tuple[fx.Node, list[fx.Node]]:
    """Walk forward from ``s`` until all its paths meet in one node ``[..., Lq, Dv]``."""
    region, open_ = [s], {s}
    node = s.next
    while node.op != "output" and len(region) < MAX_REGION:
        if any(a in open_ or a in region for a in node.all_input_nodes) and node.op == "call_function":
            region.append(node)
            for a in node.all_input_nodes:
                if a in open_ and all(u in region for u in a.users):
                    open_.discard(a)
            if node.users:
                open_.add(node)
            shp = shape_of(node)
            if open_ == {node} and shp is not None and len(shp) == 4 and same_size(shp[-2], lq) \
                    and any(same_size(shp[-1], d) for d in dv_candidates):
                return node, region
        node = node.next
    raise NoMatch("the softmax's uses never meet in one [B, H, Lq, Dv] output")


def _peel(node) -> tuple[fx.Node, str]:
    """Strip casts, a last-two-dims transpose and a K/V head repeat: ``(base, gqa kind)``."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in CASTS:
        node = node.args[0]
    node, _ = _untranspose(node)
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in CASTS:
        node = node.args[0]
    base, n_rep, kind = unrepeat(node)
    return base, (kind if n_rep > 1 else "none")


def _logits_qk(gm, s: fx.Node):
    product, scale, terms = _walk_logits(gm, s.args[0])
    if product.target is aten.einsum.default:
        (q_sub, k_sub), s_sub, (q, k) = _einsum_parts(product)
        b = q_sub[:-2]
        if not (k_sub == b + k_sub[-2] + q_sub[-1] and s_sub == b + q_sub[-2] + k_sub[-2]):
            raise NoMatch("einsum layout")
        k_rep = k
    else:
        if product.target is aten.baddbmm.default:
            raise NoMatch("baddbmm scores (3D): not a [B, H, L, D] Parallax form")
        q, kt = product.args[:2]
        kt, k_scale = _strip_scalar_scale(gm, kt)
        scale *= k_scale
        k_rep, transposed = _untranspose(kt)
        if transposed:
            raise NoMatch("keys are not transposed in QK^T")
    q, q_scale = _strip_scalar_scale(gm, q)
    return q, k_rep, scale * q_scale, terms


def _users_through_casts(node):
    """``(operand, user)`` pairs of ``node``'s users, looking through casts and dropout."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op == "call_function" and u.target in CASTS | DROPOUTS:
                todo.append(u)
            else:
                out.append((n, u))
    return out


def _product_lhs(node):
    """The un-cast left operand of a product node (``einsum``: its first operand), else None."""
    if node.op != "call_function" or node.target not in PRODUCTS:
        return None
    lhs = _einsum_parts(node)[2][0] if node.target is aten.einsum.default else node.args[0]
    while isinstance(lhs, fx.Node) and lhs.op == "call_function" and lhs.target in CASTS:
        lhs = lhs.args[0]
    return lhs


def _match_one(gm: fx.GraphModule, s: fx.Node, inputs=None) -> ParallaxSite:
    shp = shape_of(s)
    dim = s.args[1] if len(s.args) > 1 else s.kwargs.get("dim")
    if shp is None or len(shp) != 4 or dim not in (-1, 3):
        raise NoMatch("not a [B, H, Lq, Lk] softmax over keys")
    q, k_rep, scale, terms = _logits_qk(gm, s)
    k_base, k_gqa = _peel(k_rep)
    qs = shape_of(q)
    if qs is None or len(qs) != 4:
        raise NoMatch("q is not [B, H, L, D]")
    # V: the right operand of the product that the softmax weights feed directly (mu_v / o1).
    v_base, v_gqa = None, "none"
    for src, u in _users_through_casts(s):
        rhs = None
        if u.target in (aten.matmul.default, aten.bmm.default) and u.args[0] is src:
            rhs = u.args[1]
        elif u.target is aten.einsum.default and _einsum_parts(u)[2][0] is src:
            (p_sub, v_sub), o_sub, (_, rhs) = _einsum_parts(u)
            b = p_sub[:-2]
            if not (v_sub == b + p_sub[-1] + v_sub[-1] and o_sub == b + p_sub[-2] + v_sub[-1]):
                rhs = None
        if rhs is not None:
            base, kind = _peel(rhs)
            if base is not k_base:
                v_base, v_gqa = base, kind
                break
    if v_base is None:
        raise NoMatch("the softmax weights never multiply V")
    dvs = {shape_of(v_base)[-1]} if shape_of(v_base) else set()
    out, region = _output_of(s, qs[-2], dvs)
    site = ParallaxSite(module_path=owner_path(s), form="softmax", scale=scale)
    site.terms = list(terms)
    # The tensors the region reads: K, V (any view), the probe, and scores to follow back.
    in_region, r_cands, extra, todo, seen = set(region), set(), [], [], set()
    for n in region[1:]:
        todo.extend(a for a in n.all_input_nodes if a not in in_region)
    uses_mu_k = False
    while todo:
        a = todo.pop()
        if a in seen:
            continue
        seen.add(a)
        v_a = val(a)
        if a.op == "get_attr" or not isinstance(v_a, torch.Tensor):
            continue
        base, _ = _peel(a)
        if base is k_base:
            uses_mu_k = uses_mu_k or any(u in in_region and _product_lhs(u) is s for u in a.users)
            continue
        if base is v_base or a is s:
            continue
        if same_shape(shape_of(a), qs) and a is not q:
            r_cands.add(a)
            continue
        if a.op != "call_function" or len(extra) > MAX_REGION:
            raise Skip(f"the attention output also reads `{a.name}`, which is not q, k, v or a probe")
        extra.append(a)
        todo.extend(a.all_input_nodes)
    if not r_cands:
        site.form = "softmax"
        return site.skip("softmax attention without a probe (left to Inductor; "
                         "parallax_compile.compile(model, example_inputs, convert=True) upgrades it)")
    site.form = "covariance" if uses_mu_k else "streaming"
    if len(r_cands) > 1:
        return site.skip(f"{len(r_cands)} tensors shaped like q feed the output; cannot tell the probe")
    if any(is_random(n) for n in region + extra):
        return site.skip("random ops (dropout in training mode) in the attention")
    if k_gqa != v_gqa:
        return site.skip(f"K is repeated by {k_gqa} but V by {v_gqa}")
    site.gqa = k_gqa
    site.nodes = {"q": q, "k": k_base, "v": v_base, "r": r_cands.pop(), "out": out, "softmax": s}
    _detect_causal(gm, site, inputs)
    site.mask = describe_mask(site.terms, site.causal)
    return site


# --- causal masks proven by structure -----------------------------------------------------------


def _lower_or_upper(gm, node, flipped=False, depth=12, inputs=None):
    """``"lower"`` when ``node`` is True/nonzero exactly on and below the diagonal of its last two
    dims, ``"strict_upper"`` for the complement; None when that is not proven."""
    if depth == 0 or not isinstance(node, fx.Node):
        return None
    flip = {"lower": "strict_upper", "strict_upper": "lower"}

    def done(kind):
        return flip[kind] if flipped else kind

    t = node.target if node.op == "call_function" else None
    if t in NOTS:
        return _lower_or_upper(gm, node.args[0], not flipped, depth - 1, inputs)
    if t in (aten.eq.Scalar, aten.ne.Scalar) and node.args[1] == 0:
        return _lower_or_upper(gm, node.args[0], flipped ^ (t is aten.eq.Scalar), depth - 1, inputs)
    if t in CASTS or t in (aten.unsqueeze.default,):
        return _lower_or_upper(gm, node.args[0], flipped, depth - 1, inputs)
    if t is aten.slice.Tensor:
        args = list(node.args) + [None] * 4
        if args[2] not in (0, None) or args[4] not in (1, None):
            return None
        return _lower_or_upper(gm, node.args[0], flipped, depth - 1, inputs)
    if t in (aten.tril.default, aten.triu.default):
        diag = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
        inner = node.args[0]
        if not (isinstance(inner, fx.Node) and inner.op == "call_function" and (
                inner.target in (aten.ones.default, aten.ones_like.default)
                or (inner.target is aten.full.default and inner.args[1] in (1, True)))):
            return None
        shp = shape_of(inner)
        if shp is None or not same_size(shp[-1], shp[-2]):
            return None
        if t is aten.tril.default and diag == 0:
            return done("lower")
        if t is aten.triu.default and diag == 1:
            return done("strict_upper")
        return None
    if node.op in ("get_attr", "placeholder"):
        # A registered buffer: an attribute, or (Dynamo lifts buffers) a graph input whose
        # value at compile time is given in ``inputs``.
        buf = _fetch(gm, node.target) if node.op == "get_attr" else (inputs or {}).get(node)
        if not isinstance(buf, torch.Tensor) or buf.dim() < 2 or buf.shape[-1] != buf.shape[-2]:
            return None
        nz = buf != 0
        tril = torch.ones(buf.shape[-2:], dtype=torch.bool, device=buf.device).tril()
        if bool((nz == tril).all()):
            return done("lower")
        if bool((nz == ~tril).all()):
            return done("strict_upper")
    return None


def proven_lower_triangular(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when the boolean ``node`` is proven by structure to be True exactly on and below the
    diagonal of its last two dims (the forms in the module docstring: ``tril(ones(L, L))``, a
    registered lower-triangular buffer sliced from 0, through ``~``, ``== 0`` and casts). The
    caller checks that the last two dims are the query and key lengths."""
    return _lower_or_upper(gm, node) == "lower"


def _detect_causal(gm, site: ParallaxSite, inputs=None) -> None:
    q, k = site.nodes["q"], site.nodes["k"]
    if not same_size(shape_of(q)[-2], shape_of(k)[-2]):
        return
    for term in list(site.terms):
        if not isinstance(term.node, fx.Node):
            continue
        # A finite fill <= -1e9 on a proven causal pattern: every row keeps its diagonal, so the
        # filled keys' weight exp(fill - max kept logit) is 0 unless the kept logits lie within
        # ~100 of the fill (not reached by finite q . k of this magnitude): treated as causal.
        deep_fill = term.kind == "set" and term.coef <= -1e9
        if term.kind == "keep" or (deep_fill and term.negate):
            want = "lower"
        elif term.kind == "drop" or (deep_fill and not term.negate):
            want = "strict_upper"
        else:
            continue
        if _lower_or_upper(gm, term.node, inputs=inputs) == want:
            site.terms.remove(term)
            site.causal = True
            site.nodes.setdefault("causal_terms", []).append(term)


def find_parallax(gm: fx.GraphModule, inputs: dict | None = None) -> list[ParallaxSite]:
    """Every softmax of ``gm`` that is the start of attention: hand-written Parallax (matched,
    not yet verified) or plain softmax attention / an unsupported form (skipped, with the reason).

    ``inputs``: ``{placeholder: value}`` for graph inputs whose compile-time value may be read
    (buffers that Dynamo lifted to inputs, such as nanoGPT's causal ``bias``)."""
    sites = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SOFTMAX:
            continue
        try:
            sites.append(_match_one(gm, node, inputs))
        except NoMatch:
            continue
        except Skip as why:
            # Attention the passes cannot read (e.g. soft-capped logits): not known to be Parallax.
            sites.append(ParallaxSite(module_path=owner_path(node), form="attention").skip(str(why)))
    return sites


# --- rewrite + numerical check ------------------------------------------------------------------


def _hint(x) -> int:
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    hint = getattr(node, "hint", None)
    if hint is None and node is not None:
        hint = node.shape_env.size_hint(node.expr)
    return int(hint)


def _as_float64(a):
    return torch.float64 if isinstance(a, torch.dtype) and a.is_floating_point else a


def _is_size(x) -> bool:
    v = val(x)
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _random_leaf(node, kind: str, gen: torch.Generator, causal: bool) -> torch.Tensor:
    v = val(node)
    shape = [_hint(d) for d in v.shape]
    if kind == "tensor":
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(v.device)
    # A mask term: ``keep`` is True where a key is allowed (causal: the exact pattern).
    lq, lk = (shape[-2] if len(shape) > 1 else 1), shape[-1]
    if causal:
        from ..reference import allowed_keys

        keep = allowed_keys(lq, lk, causal=True).expand(shape)
    else:
        keep = torch.rand(shape, generator=gen) < 0.7
        keep[..., 0] = True  # no fully masked row (hand-written softmax would give NaN there)
    if v.dtype == torch.bool:
        return keep.to(v.device) if kind == "keep" else (~keep).to(v.device)
    if kind == "drop":
        return (~keep).to(v.dtype).to(v.device)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(v.device)


def _check(gm: fx.GraphModule, site: ParallaxSite, new_out: fx.Node, seed: int = 0) -> float:
    """Run the hand-written region and its replacement in float64 (inputs and every dtype
    argument) on random inputs; return the relative error of the replacement."""
    n = site.nodes
    leaves = {n["q"]: "tensor", n["k"]: "tensor", n["v"]: "tensor", n["r"]: "tensor"}
    causal_nodes = {t.node for t in n.get("causal_terms", [])}
    for t in site.terms + n.get("causal_terms", []):
        if isinstance(t.node, fx.Node) and t.node not in leaves:
            is_bool = val(t.node).dtype == torch.bool
            kind = t.kind if t.kind != "add" or not is_bool else ("keep" if t.negate else "drop")
            leaves[t.node] = kind
    # Everything the two outputs need, back to the leaves, to parameters/buffers and to sizes.
    need, todo = set(), [n["out"], new_out]
    while todo:
        x = todo.pop()
        if x in need:
            continue
        need.add(x)
        if x in leaves or x.op == "get_attr" or _is_size(x):
            continue
        if x.op == "placeholder":
            raise Skip(f"the attention reads the graph input `{x.name}` besides q, k, v, r and masks")
        todo.extend(x.all_input_nodes)
    sub, env, inputs = fx.Graph(), {}, []
    gen = torch.Generator().manual_seed(seed)
    for x in gm.graph.nodes:
        if x not in need:
            continue
        if x in leaves:
            env[x] = sub.placeholder(x.name)
            inputs.append(_random_leaf(x, leaves[x], gen, x in causal_nodes))
        elif x.op == "get_attr":
            env[x] = sub.get_attr(x.target)
        elif _is_size(x):
            env[x] = sub.placeholder(x.name)
            inputs.append(_hint(val(x)))
        else:
            # Every dtype constant becomes float64 (a softmax in fp32 then cast back, a cast of
            # k/v to q's dtype): the check compares formulas, in float64 throughout.
            y = sub.node_copy(x, lambda a: env[a])
            y.args, y.kwargs = fx.node.map_aggregate((y.args, y.kwargs), _as_float64)
            env[x] = y
    sub.output((env[n["out"]], env[new_out]))
    module = fx.GraphModule(gm, sub)
    with torch.no_grad():
        old, new = module(*inputs)
    return relative_error(new, old)


def rewrite_parallax(gm: fx.GraphModule, site: ParallaxSite, tolerance: float) -> bool:
    """Replace one matched site by ``torch.ops.parallax.attention``, verify it, keep it or undo.
    Returns whether the site was rewritten (``site.status`` / ``reason`` / ``max_error`` say why)."""
    n, graph = site.nodes, gm.graph
    out = n["out"]
    q, r, k, v = n["q"], n["r"], n["k"], n["v"]
    holder = AttentionSite(module_path=site.module_path, form=site.form)
    holder.nodes, holder.mask_terms = {"rank": 4}, site.terms
    dtype = val(q).dtype
    scale, causal = site.scale, site.causal
    with graph.inserting_before(out):
        if needs_logits(site.terms):
            # A finite fill sets logits (a fully filled row gets uniform weights): the op gets the
            # original logits as its mask and q = 0, exact for every input (as in rewrite_site).
            mask, scale, causal = n["softmax"].args[0], 1.0, False
            q = graph.call_function(aten.zeros_like.default, (q,))
        else:
            mask = build_mask(graph, holder, q, k)
        args = [q, r, k, v]
        for i, t in enumerate(args):
            if val(t) is not None and val(t).dtype != dtype:
                args[i] = graph.call_function(aten.to.dtype, (t, dtype))
        op = graph.call_function(torch.ops.parallax.attention.default, (*args, mask, scale, causal, None))
        new_out = graph.call_function(operator.getitem, (op, 0))
        if val(out) is not None and val(out).dtype != dtype:
            new_out = graph.call_function(aten.to.dtype, (new_out, val(out).dtype))
    try:
        err = _check(gm, site, new_out)
    except Skip as why:
        site.skip(str(why))
        return False
    except Exception as exc:  # noqa: BLE001 - a replacement that cannot even run is not kept
        site.skip(f"the numerical check failed to run: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return False
    site.max_error = err
    if not err <= tolerance:
        site.skip(f"the op differs from the hand-written attention by {err:.2e} (relative) on random "
                  f"inputs, above {tolerance:.0e}: not Parallax")
        return False
    out.replace_all_uses_with(new_out)
    site.status, site.reason = "rewritten", None
    return True
