"""Match: the catalogue of attention forms recognised in an ATen graph.

Each entry says which model families write attention that way. Matching only reads the graph;
:mod:`.rewrite` changes it. A candidate that is attention but cannot be expressed exactly by the
Parallax op becomes a *skipped* site with the reason, never a partial rewrite.

1. ``aten.scaled_dot_product_attention`` (HF ``sdpa``, ``nn.MultiheadAttention(need_weights=False)``,
   ``nn.TransformerEncoder``, timm): every flag kept: ``is_causal`` (top-left aligned when
   ``Lq != Lk``), ``attn_mask`` bool/float, ``scale``, ``enable_gqa``; ``dropout_p > 0`` is skipped.
2. ``softmax(scores) @ v`` written out (HF ``eager``, nanoGPT, BERT, T5, GPT-2, MHA with weights):
   ``scores`` from ``matmul``/``bmm``/``einsum``/``baddbmm`` of ``q`` and ``k^T``; the scale as a
   multiply or divide on the scores, on ``q`` or on ``k`` (or absent); masks by addition,
   ``masked_fill`` (also in place) or ``where``; dtype casts and (eval-mode) dropout anywhere on
   the path; reshapes that keep the last two dims ``[.., Lq, Lk]`` between the product and the
   softmax and between the softmax and ``P @ V`` (Bloom: 3-D ``baddbmm`` with the ALiBi bias,
   ``view`` to ``[B, H, Lq, Lk]`` for the mask and back to ``[B * H, Lq, Lk]`` for ``bmm``).
3. GQA: ``repeat_kv`` (unsqueeze + expand + reshape, HF) and ``repeat_interleave`` on the head dim
   are unwrapped so the op reads the un-repeated K/V.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from .graph_ops import DROPOUTS, dropout_args, is_inactive_dropout
from .site import AttentionSite, MaskTerm, owner_path

aten = torch.ops.aten

CASTS = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default,
}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.einsum.default, aten.baddbmm.default}
MULS = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar}
DIVS = {aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar}
ADDS = {aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar}
SUBS = {aten.sub.Tensor, aten.sub.Scalar, aten.sub_.Tensor}
FILLS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor}
WHERES = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SDPA = aten.scaled_dot_product_attention.default


class NoMatch(Exception):
    """Not attention at all (no site)."""


class Skip(Exception):
    """Attention, but not expressible exactly by the op; the message is the reason."""


def val(node) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _name(target) -> str:
    return getattr(target, "__name__", None) or str(target)


def const_value(gm: fx.GraphModule, x) -> float | None:
    """The number a scalar argument stands for, when it is known without running the model."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, fx.Node):
        return None
    if x.op == "get_attr":
        t = _fetch(gm, x.target)
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not isinstance(t, torch.nn.Parameter):
            return float(t.item())
        return None
    if x.op != "call_function":
        return None
    if x.target in (aten.full.default, aten.full_like.default) and len(x.args) >= 2:
        return const_value(gm, x.args[1])
    if x.target in (aten.scalar_tensor.default, aten.lift_fresh_copy.default, aten.detach.default,
                    aten.detach_.default) or x.target in CASTS:
        return const_value(gm, x.args[0])
    if x.target is aten.sqrt.default:
        inner = const_value(gm, x.args[0])
        return math.sqrt(inner) if inner is not None else None
    v = val(x)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# --- the logits path: product -> scale / masks / casts -> softmax ---------------------------


def _reaches_product(node, depth: int = 16) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth == 0:
        return False
    if node.target in PRODUCTS:
        return True
    if node.target in CASTS | MULS | DIVS | ADDS | SUBS | FILLS | RESHAPES | {aten.tanh.default}:
        return _reaches_product(node.args[0], depth - 1) or (
            node.target in MULS | ADDS and len(node.args) > 1 and _reaches_product(node.args[1], depth - 1)
        )
    if node.target in WHERES:
        return any(_reaches_product(a, depth - 1) for a in node.args[1:3])
    return False


def _spine(a, b):
    ra, rb = _reaches_product(a), _reaches_product(b)
    if ra and not rb:
        return a, b
    if rb and not ra:
        return b, a
    raise NoMatch("ambiguous scores path")


def _walk_logits(gm, x) -> tuple[fx.Node, float, list[MaskTerm]]:
    """From the softmax input back to ``QK^T``: returns the product node, the scale on it, the mask
    terms (scaled as they enter the logits) and a description of the ops."""
    ops = []
    n = x
    while True:
        if not isinstance(n, fx.Node) or n.op != "call_function":
            raise NoMatch("softmax input is not computed from a product")
        t = n.target
        if t in PRODUCTS:
            break
        if t in CASTS:
            n = n.args[0]
            continue
        if t in RESHAPES:
            if not _keeps_scores_layout(n.args[0], n):
                raise Skip("a reshape between QK^T and the softmax changes the [Lq, Lk] dims")
            ops.append(("reshape", n))
            n = n.args[0]
            continue
        if t is aten.tanh.default:
            raise Skip("logit soft-capping (tanh on the scores) cannot be expressed by the Parallax op")
        if t in MULS | DIVS:
            if t in DIVS:
                spine, other = n.args[0], n.args[1]
                if not _reaches_product(spine):
                    raise NoMatch("scores path")
            else:
                spine, other = _spine(n.args[0], n.args[1])
            c = const_value(gm, other)
            if c is None:
                raise Skip(f"scores are multiplied by a non-constant ({_name(getattr(other, 'target', other))}); "
                           "the scale must be a number")
            ops.append(("scale", c if t in MULS else 1.0 / c))
            n = spine
        elif t in ADDS | SUBS:
            spine, other = _spine(n.args[0], n.args[1])
            alpha = n.kwargs.get("alpha", 1)
            sign = -1.0 if (t in SUBS and spine is n.args[0]) else 1.0
            if t in SUBS and spine is not n.args[0]:
                raise Skip("scores are subtracted from a tensor")
            if isinstance(other, fx.Node):
                ops.append(("add", MaskTerm("add", other, sign * alpha)))
            elif float(other) != 0.0:
                raise Skip("a constant is added to the scores")
            n = spine
        elif t in FILLS:
            ops.append(("fill", _fill_term(n.args[1], const_value(gm, n.args[2]), negate=False)))
            n = n.args[0]
        elif t in WHERES:
            cond, a, b = n.args[:3]
            if _reaches_product(a) and not _reaches_product(b):
                ops.append(("fill", _fill_term(cond, const_value(gm, b), negate=True)))
                n = a
            elif _reaches_product(b) and not _reaches_product(a):
                ops.append(("fill", _fill_term(cond, const_value(gm, a), negate=False)))
                n = b
            else:
                raise NoMatch("where on scores")
        else:
            raise Skip(f"unsupported op `{_name(t)}` between QK^T and the softmax")
    # Replay in forward order: scale multiplies the product and every term added before it; a term
    # added after a reshape is laid out like the reshaped scores (``MaskTerm.scores``). A -inf fill
    # stays -inf under a later positive scale and a later finite addition; a scale <= 0 after it
    # does not (-inf * -1 = +inf), so that fill becomes a "set" term.
    scale, terms, scores = 1.0, [], None
    for kind, item in reversed(ops):
        if kind == "scale":
            scale *= item
            for term in terms:
                if term.kind == "add":
                    term.coef *= item
                elif term.kind in ("keep", "drop") and item <= 0:
                    term.kind, term.coef, term.negate = "set", -math.inf * item, term.kind == "keep"
        elif kind == "reshape":
            scores = item if shape_of(item) != shape_of(n) else None
        else:
            item.scores = scores
            terms.append(item)
    return n, scale, terms


def _keeps_scores_layout(src, dst) -> bool:
    """A reshape of the scores (or of the weights) that only splits/merges the leading dims."""
    a, b = shape_of(src), shape_of(dst)
    return a is not None and b is not None and len(a) >= 3 and len(b) >= 3 and \
        [str(d) for d in a[-2:]] == [str(d) for d in b[-2:]]


def _fill_term(cond, value, *, negate: bool) -> MaskTerm:
    """``masked_fill(scores, cond, value)`` (or ``where``) *sets* the logits where ``cond`` (or
    ``~cond`` when ``negate``) holds. -inf -> a boolean mask (setting -inf and adding -inf agree);
    any other value (finite such as ``-1e9`` / ``finfo.min``, or not a constant) -> a ``"set"``
    term: the logit no longer depends on ``q . k`` there, which no additive mask reproduces for
    every input (a row whose every key is filled gets uniform weights), so the rewrite passes the
    original logits to the op instead (:func:`.rewrite.rewrite_site`)."""
    if value == -math.inf:
        return MaskTerm("keep" if negate else "drop", cond)
    return MaskTerm("set", cond, math.nan if value is None else value, negate=negate)


def needs_logits(terms: list[MaskTerm]) -> bool:
    """Whether the mask terms set some logits to a value (a finite fill): then only the original
    logits reproduce the softmax weights exactly."""
    return any(t.kind == "set" for t in terms)


# --- K/V heads: GQA unwrapping ----------------------------------------------------------------


def unrepeat(node) -> tuple[fx.Node, int, str]:
    """Undo ``repeat_kv`` / ``repeat_interleave`` on dim 1 of ``[B, H, L, D]``: ``(inner, n_rep, kind)``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return node, 1, "none"
    shp = shape_of(node)
    if node.target is aten.repeat_interleave.self_int and shp is not None and len(shp) == 4:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dim in (1, -3) and isinstance(node.args[1], int):
            return node.args[0], node.args[1], "repeat_interleave"
    if node.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        e = node.args[0]
        while isinstance(e, fx.Node) and e.target in (aten.clone.default, aten.contiguous.default):
            e = e.args[0]
        if isinstance(e, fx.Node) and e.target is aten.expand.default:
            x = e.args[0]
            unsq = 0
            while isinstance(x, fx.Node) and x.target in (aten.slice.Tensor, aten.unsqueeze.default):
                if x.target is aten.unsqueeze.default:
                    if x.args[1] != 2:
                        return node, 1, "none"
                    unsq += 1
                elif not _full_slice(x):
                    return node, 1, "none"
                x = x.args[0]
            inner = shape_of(x)
            eshape = shape_of(e)
            if unsq == 1 and inner is not None and eshape is not None and len(inner) == 4 and len(eshape) == 5 \
                    and shp is not None and len(shp) == 4:
                n_rep = eshape[2]
                if isinstance(n_rep, int) and isinstance(inner[1], int) and isinstance(shp[1], int) \
                        and inner[1] * n_rep == shp[1]:
                    return x, n_rep, "repeat_kv"
    return node, 1, "none"


def _full_slice(node) -> bool:
    args = list(node.args) + [None] * 4
    start, end, step = args[2], args[3], args[4]
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62)) and step in (1, None)


# --- the two site forms -----------------------------------------------------------------------


def _strip_scalar_scale(gm, node) -> tuple[fx.Node, float]:
    """``q * c`` / ``q / c`` before the product (timm): returns (q, c)."""
    scale = 1.0
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in MULS | DIVS:
        c = const_value(gm, node.args[1])
        if c is None and node.target in MULS:
            c = const_value(gm, node.args[0])
            if c is None:
                break
            inner = node.args[1]
        else:
            inner = node.args[0]
        if c is None:
            break
        scale *= c if node.target in MULS else 1.0 / c
        node = inner
    return node, scale


def _untranspose(node):
    """``k^T`` -> ``(k, False)`` for a transpose/permute of the last two dims, else ``(k^T, True)``."""
    if isinstance(node, fx.Node) and node.op == "call_function":
        shp = shape_of(node)
        nd = len(shp) if shp else 0
        if node.target is aten.transpose.int:
            dims = {d % nd for d in node.args[1:3]} if nd else set()
            if dims == {nd - 1, nd - 2}:
                return node.args[0], False
        if node.target is aten.permute.default and nd:
            perm = [p % nd for p in node.args[1]]
            if perm == list(range(nd - 2)) + [nd - 1, nd - 2]:
                return node.args[0], False
        if node.target is aten.t.default:
            return node.args[0], False
    return node, True


def _einsum_parts(node):
    eq = node.args[0].replace(" ", "")
    ins, out = eq.split("->")
    return ins.split(","), out, list(node.args[1])


_WEIGHTS_PASS_THROUGH = CASTS | DROPOUTS | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.detach.default, aten.mean.dim, aten.flatten.using_ints,
}


def _reaches_output(node: fx.Node) -> bool:
    """Whether ``node``'s value reaches a graph output as attention weights (through casts,
    dropout, reshapes or the mean over heads of ``need_weights=True``)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op == "output":
                return True
            if u.op == "call_function" and u.target in _WEIGHTS_PASS_THROUGH:
                todo.append(u)
    return False


def _match_softmax(gm, sm: fx.Node) -> AttentionSite:
    dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
    shp = shape_of(sm)
    if shp is None or len(shp) not in (3, 4) or dim not in (-1, len(shp) - 1):
        raise NoMatch("softmax is not over the last dim of a 3D/4D tensor")
    # Forward: softmax -> casts / dropout -> P @ V
    n, dropouts = sm, []
    while True:
        users = list(n.users)
        if len(users) != 1:
            if len(users) == 0:
                raise NoMatch("softmax output unused")
            pv = next((u for u in users if u.target in PRODUCTS and u.args and u.args[0] is n), None)
            if pv is None and not any(u.target in PRODUCTS for u in users):
                raise NoMatch("softmax output does not feed a product")
            if _reaches_output(n):
                raise Skip("the attention weights are also used elsewhere (e.g. returned as attentions / "
                           "need_weights=True); rewriting would change that output")
            raise Skip(f"the attention weights feed {len(users) - 1} other computation(s) besides P @ V "
                       "(e.g. weighted statistics of the keys, not recognised as LLA): not softmax attention")
        u = users[0]
        if u.target in CASTS:
            n = u
            continue
        if u.target in RESHAPES and _keeps_scores_layout(n, u):
            n = u
            continue
        if u.target in DROPOUTS:
            if not is_inactive_dropout(u):
                p = dropout_args(u)[0]
                raise Skip(f"attention dropout p={p} in training mode (convert in eval mode)")
            dropouts.append(u)
            n = u
            continue
        if u.target in (aten.matmul.default, aten.bmm.default) and u.args[0] is n:
            pv, v = u, u.args[1]
            break
        if u.target is aten.einsum.default and _einsum_parts(u)[2][0] is n:
            (p_sub, v_sub), o_sub, (_, v) = _einsum_parts(u)
            b = p_sub[:-2]
            if not (v_sub == b + p_sub[-1] + v_sub[-1] and o_sub == b + p_sub[-2] + v_sub[-1]):
                raise Skip(f"einsum layout `{u.args[0]}` for P@V is not [.., Lq, Lk] x [.., Lk, Dv]")
            pv = u
            break
        raise NoMatch(f"softmax output feeds {_name(u.target)}")
    product, scale, terms = _walk_logits(gm, sm.args[0])
    form = {aten.matmul.default: "softmax(matmul)", aten.bmm.default: "softmax(bmm)",
            aten.einsum.default: "softmax(einsum)", aten.baddbmm.default: "softmax(baddbmm)"}[product.target]
    if product.target is aten.einsum.default:
        (q_sub, k_sub), s_sub, (q, k) = _einsum_parts(product)
        b = q_sub[:-2]
        if not (k_sub == b + k_sub[-2] + q_sub[-1] and s_sub == b + q_sub[-2] + k_sub[-2]):
            raise Skip(f"einsum layout `{product.args[0]}` for QK^T is not [.., Lq, D] x [.., Lk, D]")
        k_transposed = False
    else:
        if product.target is aten.baddbmm.default:
            bias, q, kt = product.args[:3]
            beta, alpha = product.kwargs.get("beta", 1), product.kwargs.get("alpha", 1)
            terms.insert(0, MaskTerm("add", bias, float(beta) * scale))
            scale *= float(alpha)
        else:
            q, kt = product.args[:2]
        kt, k_scale = _strip_scalar_scale(gm, kt)
        scale *= k_scale
        k, k_transposed = _untranspose(kt)
    q, q_scale = _strip_scalar_scale(gm, q)
    scale *= q_scale
    if len(shape_of(q) or ()) != len(shape_of(product) or ()):
        raise Skip("q and the scores have different ranks")
    empty = "zero" if sm.target is aten._safe_softmax.default else "nan"  # softmax of an all -inf row
    return _site(sm, form, q=q, k=k, v=v, out=pv, scale=scale, causal=False, terms=terms,
                 k_transposed=k_transposed,
                 extra={"softmax": sm, "scores": product, "logits": sm.args[0], "empty_rows": empty})


def _match_sdpa(gm, node: fx.Node) -> AttentionSite:
    from torch.fx.operator_schemas import normalize_function

    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    kw = norm.kwargs if norm is not None else {}
    q, k, v = kw["query"], kw["key"], kw["value"]
    dropout_p = kw.get("dropout_p", 0.0)
    if not isinstance(dropout_p, (int, float)) or dropout_p > 0:
        raise Skip(f"attention dropout_p={dropout_p} (convert in eval mode)")
    is_causal = kw.get("is_causal", False)
    if not isinstance(is_causal, bool):
        raise Skip("is_causal is not a constant")
    scale = kw.get("scale")
    if scale is not None:
        s = const_value(gm, scale)
        if s is None:
            raise Skip("the SDPA scale is not a constant")
        scale = s
    terms = []
    mask = kw.get("attn_mask")
    if mask is not None:
        mv = val(mask)
        terms.append(MaskTerm("keep" if mv is not None and mv.dtype == torch.bool else "add", mask))
    causal = False
    if is_causal:
        lq, lk = shape_of(q)[-2], shape_of(k)[-2]
        if lq is lk or (isinstance(lq, int) and isinstance(lk, int) and lq == lk) or str(lq) == str(lk):
            causal = True
        else:
            terms.append(MaskTerm("keep", "causal_top_left"))
    site = _site(node, "sdpa", q=q, k=k, v=v, out=node, scale=scale, causal=causal, terms=terms,
                 k_transposed=False, extra={"empty_rows": "zero"})  # SDPA: a row with no allowed key gives 0
    if kw.get("enable_gqa"):
        site.gqa = "enable_gqa"
    return site


def _site(anchor, form, *, q, k, v, out, scale, causal, terms, k_transposed, extra) -> AttentionSite:
    qs = shape_of(q)
    if qs is None or len(qs) not in (3, 4):
        raise Skip("q is not a 3D/4D tensor")
    ranks = {name: len(shape_of(t) or ()) for name, t in (("k", k), ("v", v))}
    if any(r != len(qs) for r in ranks.values()):
        raise Skip(f"q has {len(qs)} dims but k has {ranks['k']} and v {ranks['v']} (broadcast over the "
                   "batch, e.g. a learned memory [H, M, D]); the op needs q, k, v of one rank")
    site = AttentionSite(module_path=owner_path(anchor), form=form, scale=scale, causal=causal)
    gqa = "none"
    if not k_transposed:
        k0, nk, kind_k = unrepeat(k)
        v0, nv, kind_v = unrepeat(v)
        if nk == nv and nk > 1 and kind_k == kind_v:
            k, v, gqa = k0, v0, kind_k
    site.gqa = gqa
    ks = shape_of(k)
    if len(qs) == 4:
        site.num_heads = qs[1] if isinstance(qs[1], int) else None
        kv_heads = ks[1] if ks else None
        site.num_kv_heads = kv_heads if isinstance(kv_heads, int) else None
    site.head_dim = qs[-1] if isinstance(qs[-1], int) else None
    site.nodes = {"q": q, "k": k, "v": v, "out": out, "k_transposed": k_transposed, "rank": len(qs), **extra}
    site.mask_terms = terms
    site.mask = describe_mask(terms, causal)
    return site


def describe_mask(terms: list[MaskTerm], causal: bool) -> str:
    parts = ["causal"] if causal else []
    for t in terms:
        if t.node == "causal_top_left":
            parts.append("causal (top-left, Lq != Lk)")
            continue
        shp = shape_of(t.node)
        dims = "x".join(str(s) for s in shp) if shp else "?"
        dtype = val(t.node).dtype if isinstance(val(t.node), torch.Tensor) else None
        if t.kind == "set":
            parts.append(f"fill {t.coef:.3g} [{dims}] (sets the logit: original logits passed to the op)")
        elif t.kind == "add":
            parts.append(f"additive {str(dtype).replace('torch.', '')} [{dims}]")
        else:
            parts.append(f"bool {t.kind} [{dims}]")
    return ", ".join(parts) or "none"


def _unmatched_attention(gm, sm: fx.Node, why: NoMatch) -> str | None:
    """The reason to report for a softmax over a ``q k^T`` product (two activations, not a weight)
    that no form matched (weights times a hand-written dropout mask, SDPA decomposed by
    ``run_decompositions``); None for a softmax that is not attention."""
    try:
        _walk_logits(gm, sm.args[0])
    except Skip as skip:
        if _qk_product_above(sm.args[0]):
            return f"softmax over q k^T not rewritten: {skip}"
        return None
    except NoMatch:
        pass
    if not _qk_product_above(sm.args[0]):
        return None
    return (f"softmax over q k^T not rewritten: its form is not in the catalogue ({why}; e.g. weights "
            "multiplied by a hand-written dropout mask, or SDPA decomposed by run_decompositions)")


_PASS_THROUGH = CASTS | MULS | DIVS | ADDS | SUBS | FILLS | WHERES | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
}


def _qk_product_above(node, depth: int = 10) -> bool:
    """A product of two activations (neither a weight) above ``node`` through reshapes, casts and
    elementwise mask / scale ops only."""
    if depth == 0 or not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in PRODUCTS:
        operands = node.args[1] if node.target is aten.einsum.default else \
            node.args[1:3] if node.target is aten.baddbmm.default else node.args[:2]
        return all(isinstance(a, fx.Node) and a.op != "get_attr" for a in operands)
    if node.target in _PASS_THROUGH:
        return any(_qk_product_above(a, depth - 1) for a in node.all_input_nodes)
    return False


def find_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention site of ``gm`` in graph order, each either matched or skipped with a reason."""
    from .lla import find_lla_sites  # LLA sites own their softmax (its weights feed a solve)

    lla = {s.nodes.get("softmax"): s for s in find_lla_sites(gm)}
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node in lla:
            sites.append(lla.pop(node))
            continue
        try:
            if node.target is SDPA:
                sites.append(_match_sdpa(gm, node))
            elif node.target in SOFTMAX:
                sites.append(_match_softmax(gm, node))
        except NoMatch as why:
            reason = _unmatched_attention(gm, node, why) if node.target in SOFTMAX else None
            if reason is None:
                continue
            site = AttentionSite(module_path=owner_path(node), form="softmax")
            site.nodes = {"out": node}
            sites.append(site.skip(reason))
        except Skip as why:
            form = "sdpa" if node.target is SDPA else "softmax"
            shp = shape_of(node)
            site = AttentionSite(module_path=owner_path(node), form=form)
            if shp and len(shp) == 4 and isinstance(shp[1], int):
                site.num_heads = shp[1]
            site.nodes = {"out": node}
            sites.append(site.skip(str(why)))
    return sites + list(lla.values())


__all__ = ["find_sites", "unrepeat", "const_value", "shape_of", "val", "describe_mask"]
