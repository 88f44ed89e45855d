"""Export a converted model to MLIR through ``torch_mlir.fx.export_and_import``.

* ``raw``: the ``torch.export`` graph as MLIR; each Parallax site stays one
  ``torch.operator "torch.parallax.attention"`` operation (for a compiler that brings its own kernel).
* ``torch``, ``linalg-on-tensors``, ``stablehlo``: torch-mlir cannot legalise an
  unknown op, so the op is first decomposed into ATen ops: the portable kernel's forward block
  (:func:`parallax_compile.kernels.chunked.forward_block`, SPEC section 3) over all query rows at
  once, in fp32 (fp64 for fp64 inputs). Batch and sequence dims stay dynamic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..kernels import chunked
from .program import program

__all__ = ["OUTPUT_TYPES", "decompose_attention", "export_mlir"]

OUTPUT_TYPES = ("raw", "torch", "linalg-on-tensors", "stablehlo")  # tosa: fails to legalise aten.size.int (dynamic dims)


def decompose_attention(q, r, k, v, attn_mask=None, scale=None, causal=False, window_size=None):
    """``parallax.attention`` in ATen ops (the decomposition given to torch-mlir). Same signature
    and outputs as the op: ``out, mu_v [B, Hq, Lq, Dv]`` in q's dtype, ``lse, c [B, Hq, Lq]`` fp32."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    acc = chunked.stats_dtype(q.dtype)
    scale = d**-0.5 if scale is None else scale
    out, mu, lse, c = chunked.forward_block(
        chunked._grouped(q, hkv).to(acc), chunked._grouped(r, hkv).to(acc),
        k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2), chunked._mask_block(attn_mask, hkv, hq, 0, lq),
        scale=scale, causal=causal, window_size=window_size, i0=0, lq=lq, lk=lk,
    )
    return (out.reshape(b, hq, lq, dv).to(q.dtype), mu.reshape(b, hq, lq, dv).to(q.dtype),
            lse.reshape(b, hq, lq), c.reshape(b, hq, lq))


def export_mlir(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example_inputs: Any = None,
    path: str | Path | None = None,
    *,
    output_type: str = "raw",
    dynamic_shapes: Any = "auto",
):
    """Import ``model`` (usually the module returned by :func:`parallax_compile.convert`) into
    MLIR with torch-mlir at ``output_type`` (one of :data:`OUTPUT_TYPES`).

    ``example_inputs`` / ``dynamic_shapes`` as in :func:`parallax_compile.export_onnx` (a
    converted module's own by default). Returns the MLIR module (``torch_mlir.ir.Module``); also
    writes its text to ``path`` when given.

    Raises:
        ValueError: unknown ``output_type``, missing example inputs.
        ImportError: torch-mlir missing (``pip install 'parallax-compile[export]'``).
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"export_mlir: `output_type` must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    from torch_mlir import fx as mlir_fx
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    table = dict(get_decomposition_table())
    if output_type != "raw":
        table[torch.ops.parallax.attention.default] = decompose_attention
    ep = program(model, example_inputs, dynamic_shapes).run_decompositions(table)
    # torch-mlir's frozen import looks buffers up in state_dict only; non-persistent ones (e.g.
    # a rotary embedding's inv_freq) live in constants. Done after decomposing: the program's
    # verifier refuses them in state_dict.
    for name in ep.graph_signature.non_persistent_buffers:
        if name not in ep.state_dict and name in ep.constants:
            ep.state_dict[name] = ep.constants[name]
    module = mlir_fx.export_and_import(ep, output_type=output_type, decomposition_table={})
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(module))
    return module
