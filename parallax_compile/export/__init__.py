"""Exporters of converted models: ONNX (:mod:`.onnx`, a custom-domain node plus a model-local
function that stock ONNX Runtime inlines) and MLIR through torch-mlir (:mod:`.mlir`).
Need the ``export`` extra (onnx, onnxruntime, onnxscript, torch-mlir), imported lazily."""

from __future__ import annotations

__all__ = ["export_mlir", "export_onnx"]


def export_onnx(*args, **kwargs):
    from .onnx import export_onnx as run

    return run(*args, **kwargs)


export_onnx.__doc__ = "See :func:`parallax_compile.export.onnx.export_onnx`."


def export_mlir(*args, **kwargs):
    from .mlir import export_mlir as run

    return run(*args, **kwargs)


export_mlir.__doc__ = "See :func:`parallax_compile.export.mlir.export_mlir`."
