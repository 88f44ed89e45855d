"""Test helpers shared by the model tests: what each ``parallax.attention`` node of a converted
module actually received when it ran, probes switched on as fine-tuning leaves them, and a host-sync
counter."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


def probe_of(r: fx.Node) -> str:
    """The ``r_proj.weight`` get_attr that a Parallax node's ``r`` argument is computed from."""
    seen, todo = set(), [r]
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.op == "get_attr" and str(n.target).endswith("r_proj.weight"):
            return str(n.target)
        todo.extend(n.all_input_nodes)
    raise AssertionError(f"no probe weight feeds {r}")


class _OpRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep_of: Callable[[tuple], Any]):
        super().__init__(gm)
        self.keep_of, self.calls = keep_of, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and n.target is torch.ops.parallax.attention.default:
            args = self.fetch_args_kwargs_from_env(n)[0]
            self.calls[probe_of(n.args[1])] = self.keep_of(args)
        return out


def record_parallax_calls(gm: fx.GraphModule, inputs: dict[str, Any], keep_of) -> tuple[Any, dict[str, Any]]:
    """Run ``gm(**inputs)``; returns (outputs, ``{probe name: keep_of(op args)}``)."""
    rec = _OpRecorder(gm, keep_of)
    with torch.no_grad():
        flat = rec.run(*pytree.tree_leaves(inputs))  # the unlifted graph takes the flattened inputs
    spec = getattr(gm, "_out_spec", None)
    return (pytree.tree_unflatten(pytree.tree_leaves(flat), spec) if spec is not None else flat), rec.calls


def switch_on_probes(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Random ``W_R`` (normal, ``std``) and gains ``r_gain`` of about one (``1 + 0.5 * N(0, 1)``):
    the probes as a fine-tuning run leaves them (at conversion the gains are zero)."""
    import parallax_compile

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in parallax_compile.named_probe_parameters(model):
            if name.rsplit(".", 1)[-1].startswith("r_gain"):  # r_gain, r_gain_1, ...
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


class HostSyncs(TorchDispatchMode):
    """Counts host syncs while active (``.item()``, ``int(t)``, ``.tolist()``: each is one
    ``aten._local_scalar_dense``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))
