"""Export a converted model to ONNX with every Parallax site as one ``ai.parallax::ParallaxAttention``
node (see :mod:`.onnx_function` for the node's inputs, attributes and outputs) plus the
model-local function that implements it with standard ops, so a stock ONNX Runtime runs the file
by inlining the function and a runtime with a kernel for the op uses its kernel instead.

Goes through ``torch.onnx.export(..., dynamo=True)`` with a custom translation of
``torch.ops.parallax.attention``; batch and sequence dims stay symbolic where the converted model
has them dynamic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .onnx_function import (
    DOMAIN,
    DOMAIN_VERSION,
    MIN_OPSET,
    OP_TYPE,
    function_proto,
    register_schema,
    stats_type,
)
from .program import program

__all__ = ["DEFAULT_OPSET", "default_dim_names", "export_onnx", "name_dims", "names_from_spec", "output_names_of",
           "parallax_nodes", "run_onnx"]

DEFAULT_OPSET = 20  # torch.onnx's default; the function body needs >= 18


def _translation(opset: int):
    """The plain-Python translation of ``parallax.attention`` into one custom-domain node (an
    onnxscript *function* as translation crashes the exporter's inliner in onnxscript 0.7.2)."""
    import onnxscript
    from onnxscript import ir

    op = onnxscript.values.Opset("", opset)
    px = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def parallax_attention(q, r, k, v, attn_mask=None, scale=None, causal=False, window_size=None):
        if scale is None:
            d = q.shape[3] if q.shape is not None else None
            if not isinstance(d, int):
                raise ValueError("export_onnx: a Parallax node with scale=None needs a static head_dim")
            scale = d**-0.5
        if attn_mask is None:
            mask = op.CastLike(op.Constant(value=ir.tensor([[[[0.0]]]], dtype=ir.DataType.FLOAT)), q)
        else:
            if attn_mask.dtype == ir.DataType.BOOL:
                zero = op.CastLike(op.Constant(value_float=0.0), q)
                mask = op.Where(attn_mask, zero, op.CastLike(op.Constant(value_float=-math.inf), q))
            else:
                mask = op.CastLike(attn_mask, q)
            rank = len(attn_mask.shape) if attn_mask.shape is not None else 4
            if rank < 4:
                mask = op.Unsqueeze(mask, op.Constant(value_ints=list(range(4 - rank))))
        return px.ParallaxAttention(
            q, r, k, v, mask,
            scale=float(scale), causal=int(bool(causal)), window_size=int(window_size or 0),
            _num_outputs=4,
        )

    return parallax_attention


def _to_fp16(proto):
    """Float16 copy of an exported graph (weights, activations, float inputs and outputs), by ONNX
    Runtime's converter; the captured graph pins float32 casts, so halving the PyTorch module
    before export does not work. The Parallax function (added afterwards) computes in float."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(proto, keep_io_types=False, disable_shape_infer=True)
    # The converter marks every float value float16; the row statistics stay float.
    stats = {o for n in parallax_nodes(proto) for o in n.output[2:]}
    kept = [vi for vi in proto.graph.value_info if vi.name not in stats]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return proto


def export_onnx(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example_inputs: Any = None,
    path: str | Path = "model.onnx",
    *,
    opset: int | None = None,
    dynamic_shapes: Any = "auto",
    fp16: bool = False,
    accumulate: str = "float",
    check: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dim_names: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Write ``model`` (usually the module returned by :func:`parallax_compile.convert`) to an
    ONNX file at ``path``; returns the path.

    Every ``parallax.attention`` node becomes one ``ai.parallax::ParallaxAttention`` v1 node
    (inputs ``q, r, k, v, attn_mask``; attributes ``scale``, ``causal``, ``window_size``; outputs
    ``out, mu_v, lse, c``: shapes in :mod:`parallax_compile.export.onnx_function`), and the file
    carries a model-local function with its standard-op body (what stock ONNX Runtime inlines).

    Args:
        model: a converted ``GraphModule`` (its example inputs and dynamic dims are used when
            ``example_inputs`` is None), any module with ``example_inputs``, or an ``ExportedProgram``.
        example_inputs: a Tensor, tuple of positional inputs, dict of keyword inputs, or ``(args, kwargs)``.
        path: output file (weights inline; files over 2 GB get external data next to it).
        opset: default ONNX opset (>= 18; default 20). The function body uses the same opset.
        dynamic_shapes: as ``torch.export``; ``"auto"`` takes the conversion's (batch and
            sequence symbolic), or static shapes for a module that was not converted.
        fp16: convert the exported graph to float16 (weights, float inputs and outputs; through
            ONNX Runtime's float16 converter). The Parallax function still accumulates in float.
        accumulate: ``"float"`` (default) or ``"double"``: the type the function body computes
            in for float/float16 inputs (the PyTorch op accumulates fp32 in fp64 on the CPU).
        check: run ``onnx.checker.check_model(full_check=True)`` on the written file.
        input_names: ONNX names of the flattened inputs (default: the keyword names).
        output_names: ONNX names of the flattened outputs (default: the output's field names, e.g.
            ``logits`` / ``last_hidden_state``; ``output`` / ``output_<i>`` for unnamed ones).
        dim_names: ``{input name: {axis: name}}`` for the symbolic dims (default:
            :func:`default_dim_names`); every dim of the graph built from a named symbol is renamed
            too (``present.0.key``'s ``s5 + s70`` becomes ``past_sequence_length + sequence_length``).

    Raises:
        ValueError: opset below 18, unknown ``accumulate``, missing example inputs.
        ImportError: onnx / onnxscript missing (``pip install 'parallax-compile[export]'``).
    """
    import onnx
    from onnx import TensorProto

    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ValueError(f"export_onnx: `opset` must be >= {MIN_OPSET} (the Parallax function body), got {opset}")
    acc = {"float": TensorProto.FLOAT, "double": TensorProto.DOUBLE}.get(accumulate)
    if acc is None:
        raise ValueError(f"export_onnx: `accumulate` must be 'float' or 'double', got {accumulate!r}")
    register_schema()
    ep = program(model, example_inputs, dynamic_shapes)
    ep._guards_code = []  # ONNX has no guards; the exporter's re-trace trips on some (None.size)
    onnx_program = torch.onnx.export(
        ep, (), dynamo=True, opset_version=opset, optimize=True, verbose=False, input_names=input_names,
        output_names=output_names or output_names_of(ep),
        custom_translation_table={torch.ops.parallax.attention.default: _translation(opset)},
    )
    proto = onnx_program.model_proto
    name_dims(proto, default_dim_names(proto) if dim_names is None else dim_names)
    if fp16:
        proto = _to_fp16(proto)
    elem = _attention_type(proto)
    if elem is not None:
        if elem == TensorProto.DOUBLE:
            acc = TensorProto.DOUBLE
        fn = function_proto(opset, accumulate=acc, stats=stats_type(elem))
        keep = [f for f in proto.functions if (f.domain, f.name) != (DOMAIN, OP_TYPE)]
        del proto.functions[:]
        proto.functions.extend(keep + [fn])
    if not any(o.domain == DOMAIN for o in proto.opset_import) and elem is not None:
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = sum(len(t.raw_data) for t in proto.graph.initializer) > 1_800_000_000  # protobuf's 2 GB
    onnx.save_model(proto, str(path), save_as_external_data=large,
                    location=path.name + ".data" if large else None)
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    return path


def output_names_of(ep: torch.export.ExportedProgram) -> list[str]:
    """Names of a program's flattened outputs as Optimum writes them: the field path of a
    ``ModelOutput`` / dict (``logits``, ``last_hidden_state``, ``past_key_values.0.0``), else
    ``output`` for a lone tensor and ``output_<i>`` for a tuple's items."""
    return names_from_spec(ep.call_spec.out_spec)


def names_from_spec(spec) -> list[str]:
    """:func:`output_names_of` for an output ``TreeSpec``."""
    from torch.utils import _pytree as pytree

    leaves = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths = [path for path, _ in pytree.tree_flatten_with_path(leaves)[0]]
    names = []
    for i, path in enumerate(paths):
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
        if not path or all(isinstance(k, pytree.SequenceKey) for k in path):
            names.append("output" if len(paths) == 1 else f"output_{i}")
        else:
            names.append(".".join(parts))
    return names


_TOKEN_DIMS = {"decoder_input_ids": "decoder_sequence_length", "decoder_attention_mask": "decoder_sequence_length"}


def default_dim_names(proto) -> dict[str, dict[int, str]]:
    """Optimum's dim names for the graph's inputs: axis 0 of every input ``batch_size``; axis 1 of
    an integer ``[B, L]`` input (``input_ids``, ``attention_mask``, ``position_ids``, a
    nanoGPT's ``idx``) and of a float ``[B, L, C]`` input ``sequence_length``
    (``decoder_sequence_length`` for ``decoder_*`` inputs)."""
    from onnx import TensorProto

    ints = {TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL}
    names = {}
    for inp in proto.graph.input:
        tt = inp.type.tensor_type
        rank = len(tt.shape.dim)
        dims = {0: "batch_size"} if rank else {}
        if (rank == 2 and tt.elem_type in ints) or (rank == 3 and tt.elem_type not in ints):
            dims[1] = _TOKEN_DIMS.get(inp.name, "sequence_length")
        names[inp.name] = dims
    return names


def name_dims(proto, dim_names: dict[str, dict[int, str]]) -> None:
    """Rename symbolic dims in place: ``dim_names[input][axis]`` names the symbol found there, and
    that symbol is replaced everywhere (inputs, outputs, value_info; inside expressions such as
    ``s5 + s70``). Dims given a name that are static stay static."""
    import re

    symbols: dict[str, str] = {}
    for inp in proto.graph.input:
        for axis, name in dim_names.get(inp.name, {}).items():
            dims = inp.type.tensor_type.shape.dim
            if axis < len(dims) and re.fullmatch(r"[A-Za-z_]\w*", dims[axis].dim_param or "-"):
                symbols.setdefault(dims[axis].dim_param, name)
    if not symbols:
        return
    token = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b")
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = token.sub(lambda m: symbols[m.group(1)], d.dim_param)


def _attention_type(proto) -> int | None:
    """ONNX element type of the first Parallax node's ``q`` (None without Parallax nodes); all
    Parallax nodes of one model must share it (the function body's accumulation is per model)."""
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
    found = set()
    for node in parallax_nodes(proto):
        found.add(types.get(node.input[0], 0))
    found.discard(0)
    if len(found) > 1:
        raise ValueError(f"export_onnx: Parallax nodes with different input types {sorted(found)}; export "
                         "one dtype per model")
    if not found and parallax_nodes(proto):
        import onnx

        return onnx.TensorProto.FLOAT  # shape inference left the type unknown: the common case
    return found.pop() if found else None


def parallax_nodes(proto) -> list:
    """The ``ai.parallax::ParallaxAttention`` nodes of a ``ModelProto``'s main graph."""
    return [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def run_onnx(path: str | Path, inputs: dict[str, Any], *, session=None, fast_path: bool | None = False) -> list:
    """Run an exported file in ONNX Runtime (CPU) on keyword ``inputs`` (tensors by the model's
    input names; non-tensor entries such as ``use_cache`` are dropped, as the exporter folds them).
    Returns the outputs as numpy arrays, in the graph's output order. Pass an existing
    ``onnxruntime.InferenceSession`` as ``session`` to reuse it; otherwise one is made by
    :func:`parallax_compile.export.ort_kernel.session` (``fast_path``: False runs the function
    body; True / None the optional onnxruntime-extensions kernel, see that module)."""
    if session is None:
        from .ort_kernel import session as make_session

        session = make_session(path, fast_path=fast_path)
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if not isinstance(inputs.get(n), torch.Tensor)]
    if missing:
        raise ValueError(f"run_onnx: missing tensor inputs {missing}; the model takes {names}")
    return session.run(None, {n: inputs[n].detach().cpu().numpy() for n in names})
