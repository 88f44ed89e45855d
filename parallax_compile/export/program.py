"""The ``torch.export`` program both exporters start from."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["program"]


def program(model, example_inputs: Any = None, dynamic_shapes: Any = "auto") -> torch.export.ExportedProgram:
    """The ``torch.export`` program to translate: an ``ExportedProgram`` as is; a converted module
    without ``example_inputs`` on its own example inputs and dynamic dims (what
    :func:`parallax_compile.saving.exported_program` saves); otherwise ``model`` on
    ``example_inputs`` (a Tensor, tuple, dict or ``(args, kwargs)``) with ``dynamic_shapes``
    (``"auto"``: the conversion's dynamic dims for a converted module, else static). Raises ``ValueError`` when example inputs are needed and missing."""
    if isinstance(model, torch.export.ExportedProgram):
        return model
    meta = getattr(model, "meta", {}) if isinstance(model, torch.fx.GraphModule) else {}
    info, loaded = meta.get("parallax"), meta.get("parallax_reference")  # convert / load
    if example_inputs is None:
        if info is None and loaded is None:
            raise ValueError("export: `example_inputs` is required for a module that is not the result of "
                             "parallax_compile.convert or parallax_compile.load")
        if dynamic_shapes == "auto":
            from ..saving import exported_program

            return exported_program(model)
        example_inputs = (info.example_args, info.example_kwargs) if info is not None else loaded[:2]
    from ..passes.capture import _split_inputs

    args, kwargs = _split_inputs(example_inputs)
    shapes = dynamic_shapes
    if dynamic_shapes == "auto":  # a converted module keeps its conversion's dynamic dims (inputs named as
        shapes = info.dynamic_shapes if info is not None else (loaded[3] if loaded else None)  # others: static
    return torch.export.export(model, tuple(args), dict(kwargs), dynamic_shapes=shapes, strict=False)
