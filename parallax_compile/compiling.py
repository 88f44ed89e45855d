"""``parallax_compile.compile``: convert a model's softmax attention to Parallax, then compile it
with the ``parallax`` backend (a backend alone cannot add parameters to a model it does not own).
"""

from __future__ import annotations

import torch

from .backend import parallax_backend
from .convert import run_conversion
from .probes import gain_name

__all__ = ["compile_model"]


def _register_probes(model: torch.nn.Module, gm: torch.fx.GraphModule, info) -> list[str]:
    """Attach each probe of ``gm`` (``<owner>.r_proj``) and its gain (``<owner>.r_gain``) to the
    owning module of ``model`` itself, so ``model.parameters()`` yields the very Parameter objects
    the compiled graph reads."""
    names = []
    for site in info.rewritten:
        path = site.probe.rsplit(".", 1)[0]  # "<owner>.r_proj[_N]"
        owner, _, name = path.rpartition(".")
        target = model.get_submodule(owner) if owner else model
        gain = gain_name(name)
        added = {name: gm.get_submodule(path), gain: gm.get_parameter(f"{owner}.{gain}" if owner else gain)}
        for attr, obj in added.items():
            existing = getattr(target, attr, None)
            if existing is not None and existing is not obj:
                raise RuntimeError(
                    f"parallax_compile.compile: `{owner or type(model).__name__}` already has an attribute "
                    f"`{attr}`; cannot register the probe of the attention there")
        target.add_module(name, added[name])
        target.register_parameter(gain, added[gain])
        names.append(site.probe)
    return names


def compile_model(model: torch.nn.Module, example_inputs, *, convert: bool = True, dynamic_dims=None,
                  valid_positions=None, **compile_kwargs):
    """Compile ``model`` with the ``parallax`` backend, first upgrading its softmax attention.

    With ``convert=True`` the model is converted as :func:`parallax_compile.convert` does (capture
    with ``torch.export`` on ``example_inputs``, rewrite every provably equivalent attention into
    ``torch.ops.parallax.attention`` with a probe ``W_R`` and a zero gain, verify), and each probe
    is registered on the owning module of ``model`` (``<owner>.r_proj``): ``model.parameters()``
    and ``model.state_dict()`` then include the probes, and they are the same ``Parameter``
    objects the compiled graph trains. **Build the optimizer after this call** (an optimizer
    built before it does not know the probes). The converted graph runs the model as captured in
    eval mode (dropout inactive), with batch and sequence dims dynamic where the model allows.

    With ``convert=False`` this is ``torch.compile(model, backend="parallax", **compile_kwargs)``
    (which still rewrites hand-written Parallax and keeps ``parallax.attention`` nodes whole).

    Args:
        model: the ``nn.Module`` to compile; its parameters are shared, not copied.
        example_inputs: a Tensor, a tuple of positional inputs, a dict of keyword inputs or
            ``(args, kwargs)``, as for :func:`parallax_compile.convert`.
        convert: convert softmax attention into Parallax first.
        dynamic_dims, valid_positions: passed to the conversion (see ``convert``).
        **compile_kwargs: passed to ``torch.compile`` (``dynamic``, ``fullgraph``, ``mode``...).

    Returns:
        The compiled callable, called like ``model``. Its ``meta["parallax"]`` (on
        ``compiled._orig_mod``) is the conversion report when ``convert=True``.

    Raises:
        RuntimeError: the model cannot be captured, or an owning module already has an ``r_proj``
            attribute that is not the probe.
    """
    if "backend" in compile_kwargs:
        raise TypeError("parallax_compile.compile: `backend` is always the parallax backend")
    if not convert:
        return torch.compile(model, backend=parallax_backend, **compile_kwargs)
    gm, info = run_conversion(model, example_inputs, dynamic_dims=dynamic_dims, valid_positions=valid_positions)
    _register_probes(model, gm, info)
    gm.train(model.training)
    return torch.compile(gm, backend=parallax_backend, **compile_kwargs)
