"""The ``package.module:factory`` spec: a model from the user's own code."""

from __future__ import annotations

import importlib
import re
from typing import Any

import torch

from .loaded import LoadedModel

__all__ = ["FACTORY_SPEC", "load_factory"]

FACTORY_SPEC = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*)")


def load_factory(spec: str) -> LoadedModel:
    """Import ``package.module`` and call ``factory()``. It returns an ``nn.Module`` with an
    ``example_inputs`` dict attribute, or a tuple ``(module, example_inputs)``. Optional module
    attributes ``dynamic_dims`` and ``valid_positions`` fill the fields of the same name (without
    ``dynamic_dims``, dims 0 and 1 of every tensor input are dynamic, as in the Python API). The
    module is put in eval mode; its dtype and device are left as the factory made them."""
    m = FACTORY_SPEC.fullmatch(spec)
    if m is None:
        raise ValueError(f"{spec!r} is not of the form package.module:factory")
    try:
        module = importlib.import_module(m["module"])
    except ImportError as e:
        raise ValueError(f"{spec}: cannot import module {m['module']!r} ({e})") from e
    factory = getattr(module, m["attr"], None)
    if not callable(factory):
        raise ValueError(f"{spec}: module {m['module']!r} has no callable {m['attr']!r}")
    made: Any = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, inputs = made
    elif isinstance(made, torch.nn.Module):
        model, inputs = made, getattr(made, "example_inputs", None)
        if inputs is None:
            raise ValueError(
                f"{spec}: the module it returned has no `example_inputs` attribute; set "
                f"`model.example_inputs = {{'x': tensor, ...}}` or return `(model, example_inputs)`"
            )
    else:
        raise ValueError(
            f"{spec}: factory must return an nn.Module or (nn.Module, dict), got {type(made).__name__}"
        )
    if not isinstance(inputs, dict):
        raise ValueError(
            f"{spec}: example_inputs must be a dict of keyword inputs, got {type(inputs).__name__}"
        )
    return LoadedModel(
        spec=spec,
        model=model.eval(),
        example_inputs=dict(inputs),
        # Absent: None, so the capture marks dims 0 and 1 of every tensor input dynamic, as
        # parallax_compile.convert(model, inputs) does ({} would make every dim static).
        dynamic_dims=getattr(model, "dynamic_dims", None),
        valid_positions=getattr(model, "valid_positions", None),
        description=f"{type(model).__name__} from {spec}",
    )
