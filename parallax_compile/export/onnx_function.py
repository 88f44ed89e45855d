"""The ONNX form of the Parallax op: the ``ai.parallax::ParallaxAttention`` schema and the
model-local ONNX function (standard ops only) that lets a stock ONNX Runtime run it by inlining.

Node (domain ``ai.parallax``, version 1; SPEC sections 2-3, paper arXiv 2605.29157)::

    out, mu_v, lse, c = ParallaxAttention(q, r, k, v[, attn_mask], scale=f, causal=i, window_size=i)

=============  =========================  ==========================================================
input          shape                      meaning
=============  =========================  ==========================================================
q              [B, Hq, Lq, D]             queries (float16 / float / double)
r              [B, Hq, Lq, D]             probes (not multiplied by ``scale``)
k              [B, Hkv, Lk, D]            keys; ``Hq % Hkv == 0`` (GQA: head h reads h // (Hq/Hkv))
v              [B, Hkv, Lk, Dv]           values
attn_mask      rank 4, broadcastable to   additive mask (0 = keep, -inf = drop), q's type; head
               [B, Hq, Lq, Lk]            dim 1 or Hq. The exporter always passes one (``[1,1,1,1]``
                                          zeros when the model has none): the function body needs it
=============  =========================  ==========================================================

Attributes: ``scale`` (float, on ``q . k``), ``causal`` (int 0/1, end-aligned: row i sees keys
``j <= i + Lk - Lq``), ``window_size`` (int, 0 = none; keys ``j > i' - W``, and ``j < i' + W``
when not causal). Outputs: ``out`` and ``mu_v`` ``[B, Hq, Lq, Dv]`` in q's type, ``lse`` and
``c`` ``[B, Hq, Lq]`` float (float for float16 inputs; ``lse = +inf`` marks a row with no
allowed key, whose ``out`` is 0). The body accumulates in float (double for double inputs).
"""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto, helper

__all__ = ["DOMAIN", "DOMAIN_VERSION", "MIN_OPSET", "OP_TYPE", "function_proto", "register_schema", "stats_type"]

DOMAIN, DOMAIN_VERSION, OP_TYPE = "ai.parallax", 1, "ParallaxAttention"
MIN_OPSET = 18  # ReduceMax/ReduceSum with axes as an input


def _formal(name: str, type_str: str, doc: str, optional: bool = False):
    P = onnx.defs.OpSchema.FormalParameter
    opt = onnx.defs.OpSchema.FormalParameterOption
    return P(name, type_str, doc, param_option=opt.Optional if optional else opt.Single)


def _infer(ctx) -> None:
    """Output types and shapes: out, mu_v like q with v's last dim; lse, c ``[B, Hq, Lq]``."""
    q, v = ctx.get_input_type(0), ctx.get_input_type(3)
    if q is None or not q.HasField("tensor_type"):
        return
    elem = q.tensor_type.elem_type
    stat = stats_type(elem)
    q_dims = list(q.tensor_type.shape.dim) if q.tensor_type.HasField("shape") else None
    dv = None
    if v is not None and v.tensor_type.HasField("shape") and len(v.tensor_type.shape.dim) == 4:
        dv = v.tensor_type.shape.dim[3]
    for i in range(ctx.get_num_outputs()):
        out = onnx.TypeProto()
        out.tensor_type.elem_type = elem if i < 2 else stat
        if q_dims is not None and len(q_dims) == 4:
            dims = q_dims[:3] + ([dv] if i < 2 and dv is not None else [q_dims[3]] if i < 2 else [])
            if i < 2 and dv is None:
                dims = None
            if dims is not None:
                shape = out.tensor_type.shape
                for d in dims:
                    shape.dim.add().CopyFrom(d)
        ctx.set_output_type(i, out)


def stats_type(elem: int) -> int:
    """ONNX type of ``lse`` and ``c`` for inputs of type ``elem`` (as the PyTorch op: fp32,
    fp64 for fp64 inputs)."""
    return TensorProto.DOUBLE if elem == TensorProto.DOUBLE else TensorProto.FLOAT


def register_schema() -> None:
    """Register ``ai.parallax::ParallaxAttention`` v1 with ``onnx.defs`` (idempotent): the
    exporter and ``onnx.checker`` need it to accept the node."""
    if onnx.defs.has(OP_TYPE, DOMAIN_VERSION, DOMAIN):
        return
    A = onnx.defs.OpSchema.Attribute
    AT = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, DOMAIN_VERSION,
        "Parallax attention o = mu_v - C_vk r (parallax_compile; SPEC sections 2-3).",
        inputs=[
            _formal("q", "T", "queries [B, Hq, Lq, D]"),
            _formal("r", "T", "probes [B, Hq, Lq, D]"),
            _formal("k", "T", "keys [B, Hkv, Lk, D]"),
            _formal("v", "T", "values [B, Hkv, Lk, Dv]"),
            _formal("attn_mask", "T", "additive mask, rank 4, broadcastable to [B, Hq, Lq, Lk]", True),
        ],
        outputs=[
            _formal("out", "T", "[B, Hq, Lq, Dv]"),
            _formal("mu_v", "T", "softmax attention output [B, Hq, Lq, Dv]", True),
            _formal("lse", "S", "row log-sum-exp [B, Hq, Lq] (+inf: no allowed key)", True),
            _formal("c", "S", "row statistic d2/d1 [B, Hq, Lq]", True),
        ],
        type_constraints=[
            ("T", ["tensor(float16)", "tensor(float)", "tensor(double)"], "q, r, k, v, mask and out"),
            ("S", ["tensor(float)", "tensor(double)"], "row statistics"),
        ],
        attributes=[
            A("scale", AT.FLOAT, "softmax temperature on q . k", required=True),
            A("causal", helper.make_attribute("causal", 0), "1: end-aligned causal mask"),
            A("window_size", helper.make_attribute("window_size", 0), "sliding window in keys; 0 = none"),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer)
    onnx.defs.register_schema(schema)


class _Body:
    """Tiny builder of a function body: ``b.op("MatMul", x, y)`` returns the new value's name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs):
        outs = [name] if name else [f"_{op_type.lower()}_{self._n + i}" for i in range(outputs)]
        self._n += outputs
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=TensorProto.INT64) -> str:
        vals = value if isinstance(value, list) else [value]
        dims = [len(vals)] if isinstance(value, list) else []
        return self.op("Constant", value=helper.make_tensor("c", dtype, dims, vals))

    def attr_const(self, attr: str, kind: str) -> str:
        node = helper.make_node("Constant", [], [f"_attr_{attr}"])
        ref = onnx.AttributeProto()
        ref.name, ref.ref_attr_name = kind, attr
        ref.type = onnx.AttributeProto.FLOAT if kind == "value_float" else onnx.AttributeProto.INT
        node.attribute.append(ref)
        self.nodes.append(node)
        return f"_attr_{attr}"


def function_proto(opset: int, accumulate: int = TensorProto.FLOAT, stats: int = TensorProto.FLOAT) -> onnx.FunctionProto:
    """The model-local function implementing the node with standard ops of ``opset`` (>= 18),
    computing in ``accumulate`` (an ``onnx.TensorProto`` type: FLOAT, or DOUBLE to match the
    PyTorch op's CPU path bit for bit more closely) with row statistics returned as ``stats``:
    grouped (GQA) matmuls without repeating k/v, the end-aligned causal / window pattern built
    from ``Range``, and the softmax moments of SPEC section 3 in one pass, with rows that have no
    allowed key giving 0 (as the PyTorch op)."""
    if opset < MIN_OPSET:
        raise ValueError(f"export_onnx: `opset` must be >= {MIN_OPSET} for the Parallax function, got {opset}")
    b = _Body()
    FLOAT = TensorProto.FLOAT
    acc_like = b.const(0.0, accumulate)  # CastLike(x, acc_like): to the accumulation type
    # Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [..., Dv]; mask [Bm, Hm, Lqm, Lk].
    sq, sk, sv, sm = (b.op("Shape", x) for x in ("q", "k", "v", "attn_mask"))
    sl = lambda s, i, j: b.op("Slice", s, b.const([i]), b.const([j]))
    cast = lambda x: b.op("CastLike", x, acc_like)
    minus1 = b.const([-1])
    # GQA without repeating k, v: the G query heads of one KV head are stacked as rows,
    # q [B, Hq, Lq, D] -> [B, Hkv, G*Lq, D] (a free reshape), so every matmul is a plain batched one.
    stacked = b.op("Concat", sl(sk, 0, 2), minus1, sl(sq, 3, 4), axis=0)
    qs = b.op("Reshape", cast("q"), stacked)
    rs = b.op("Reshape", cast("r"), stacked)
    k, v = cast("k"), cast("v")
    scale = b.op("CastLike", b.attr_const("scale", "value_float"), acc_like)
    # One Transpose per product, so ONNX Runtime can fold each into its MatMul.
    logits = b.op("Mul", b.op("MatMul", qs, b.op("Transpose", k, perm=[0, 1, 3, 2])), scale)  # [B, Hkv, G*Lq, Lk]
    g = b.op("MatMul", rs, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    # Causal / window pattern [Lq, Lk] with i' = i + Lk - Lq (disabled parts all-true), as an
    # additive 0 / -inf pattern folded into the (small, broadcast) mask before it meets the logits.
    zero, one = b.const(0), b.const(1)
    lq = b.op("Squeeze", sl(sq, 2, 3), b.const([0]))
    lk = b.op("Squeeze", sl(sk, 2, 3), b.const([0]))
    i_al = b.op("Unsqueeze", b.op("Add", b.op("Range", zero, lq, one), b.op("Sub", lk, lq)), b.const([1]))
    j = b.op("Unsqueeze", b.op("Range", zero, lk, one), b.const([0]))
    causal = b.op("Cast", b.attr_const("causal", "value_int"), to=TensorProto.BOOL)
    window = b.attr_const("window_size", "value_int")
    keep = b.op("Or", b.op("Not", causal), b.op("LessOrEqual", j, i_al))
    in_window = b.op("And", b.op("Greater", j, b.op("Sub", i_al, window)),
                     b.op("Or", causal, b.op("Less", j, b.op("Add", i_al, window))))
    keep = b.op("And", keep, b.op("Or", b.op("Equal", window, zero), in_window))
    neg_inf = b.op("CastLike", b.const(-math.inf, FLOAT), acc_like)
    zero_acc = b.op("CastLike", b.const(0.0, FLOAT), acc_like)
    one_acc = b.op("CastLike", b.const(1.0, FLOAT), acc_like)
    # Mask as [Bm, min(Hm, Hkv), -1, Lqm, Lk] (head dim 1 -> (1, 1), Hq -> (Hkv, G)) plus the pattern.
    hm = b.op("Min", sl(sm, 1, 2), sl(sk, 1, 2))
    mask5 = b.op("Reshape", cast("attn_mask"), b.op("Concat", sl(sm, 0, 1), hm, minus1, sl(sm, 2, 4), axis=0))
    mask5 = b.op("Add", mask5, b.op("Where", keep, zero_acc, neg_inf))
    grouped = b.op("Concat", sl(sk, 0, 2), minus1, sl(sq, 2, 3), sl(sk, 2, 3), axis=0)  # [B, Hkv, G, Lq, Lk]
    logits = b.op("Add", b.op("Reshape", logits, grouped), mask5)
    logits = b.op("Reshape", logits, b.op("Shape", g))  # back to [B, Hkv, G*Lq, Lk]
    # Moments (SPEC section 3): p = exp(l - m), d1 = sum p, d2 = sum p g, O1 = p v, O2 = (p g) v.
    last = b.const([-1])
    m = b.op("ReduceMax", logits, last, keepdims=1)
    empty = b.op("Equal", m, neg_inf)  # no allowed key: output 0, lse = +inf
    p = b.op("Exp", b.op("Sub", logits, b.op("Where", empty, zero_acc, m)))
    pg = b.op("Mul", p, g)
    d1 = b.op("ReduceSum", p, last, keepdims=1)
    d2 = b.op("ReduceSum", pg, last, keepdims=1)
    o1 = b.op("MatMul", p, v)
    o2 = b.op("MatMul", pg, v)
    inv = b.op("Where", empty, zero_acc, b.op("Reciprocal", b.op("Where", empty, one_acc, d1)))
    mu = b.op("Mul", o1, inv)
    c = b.op("Mul", d2, inv)
    out = b.op("Sub", b.op("Mul", mu, b.op("Add", one_acc, c)), b.op("Mul", o2, inv))
    # Back to [B, Hq, Lq, Dv] in q's type; statistics [B, Hq, Lq] in the accumulation type.
    out_shape = b.op("Concat", sl(sq, 0, 3), sl(sv, 3, 4), axis=0)
    b.op("CastLike", b.op("Reshape", out, out_shape), "q", name="out")
    b.op("CastLike", b.op("Reshape", mu, out_shape), "q", name="mu_v")
    lse = b.op("Where", empty, b.op("CastLike", b.const(math.inf, FLOAT), acc_like), b.op("Add", m, b.op("Log", d1)))
    stat_shape = sl(sq, 0, 3)
    b.op("Cast", b.op("Reshape", lse, stat_shape), to=stats, name="lse")
    b.op("Cast", b.op("Reshape", c, stat_shape), to=stats, name="c")
    return helper.make_function(
        DOMAIN, OP_TYPE,
        inputs=["q", "r", "k", "v", "attn_mask"],
        outputs=["out", "mu_v", "lse", "c"],
        nodes=b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["scale"],
        attribute_protos=[helper.make_attribute("causal", 0), helper.make_attribute("window_size", 0)],
        doc_string="Parallax attention with standard ONNX ops (parallax_compile.export).",
    )
