"""The ``parallax`` torch.compile backend: match -> rewrite -> lower (Inductor, AOT autograd).

``torch.compile(model, backend="parallax")`` (registered through the ``torch_dynamo_backends``
entry point: no import needed) or ``backend=parallax_compile.backend.parallax_backend``.

For each graph Dynamo hands over:

1. **ATen graph.** ``make_fx(gm, pre_dispatch=True)`` under Dynamo's fake mode: the same
   un-decomposed ATen graph ``torch.export`` gives the passes (symbolic sizes stay symbolic, so
   ``dynamic=True`` compiles once for every sequence length).
2. **Passes.** ``parallax.attention`` nodes are kept as they are (one opaque node each);
   Parallax written in plain torch ops (covariance or streaming form, causal masks, GQA) is
   replaced by the op after a numerical check (:mod:`.passes.parallax_pattern`).
3. **Lowering.** The rewritten graph goes to Inductor (``compile_fx``), which runs AOT autograd:
   the op's registered autograd makes the backward graph call ``parallax.attention_backward``,
   so training uses the fused kernels in both directions (Triton on CUDA, the chunked kernels on
   the CPU); everything else is Inductor's.

:func:`last_report` returns what the last compiled graph contained; ``torch._dynamo.utils.counters
["parallax"]`` accumulates the same counters over the process (``graphs``, ``op``, ``covariance``,
``streaming``, ``skipped``, ``softmax``); the logger ``parallax_compile.backend`` says the same at
INFO (one line per graph) and DEBUG (one line per site). Should the passes themselves fail on
some graph, it is compiled as Dynamo captured it (``parallax.attention`` nodes are opaque
either way), with a warning, ``counters["parallax"]["failed_passes"]`` and the reason in
``last_report().note``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .checks import TOLERANCE
from .passes.parallax_pattern import ParallaxSite, find_parallax, rewrite_parallax
from .passes.rewrite import drop_dead_code

__all__ = ["BackendReport", "last_report", "parallax_backend", "run_passes", "to_aten"]



@dataclass
class BackendReport:
    """What the backend found in one Dynamo graph.

    ``counters``: ``op`` (``parallax.attention`` nodes kept as one node), ``covariance`` and
    ``streaming`` (hand-written Parallax rewritten into the op), ``skipped`` (hand-written
    Parallax left as written, see ``sites``), ``softmax`` (other attention, left to Inductor:
    plain softmax attention, or a form the pass cannot read; the reason is in ``sites``).
    """

    sites: list[ParallaxSite] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    num_nodes: int = 0
    note: str = ""
    """Set when the passes could not run and the graph was compiled as Dynamo captured it."""

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in self.counters.items() if v]
        return ", ".join(parts) or "no attention found"

    @property
    def matched(self) -> list[ParallaxSite]:
        return [s for s in self.sites if s.form in PARALLAX_FORMS]

    @property
    def rewritten(self) -> list[ParallaxSite]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> list[ParallaxSite]:
        return [s for s in self.sites if s.status != "rewritten" and s.form in PARALLAX_FORMS]

    def as_dict(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "num_nodes": self.num_nodes, "note": self.note,
                "sites": [s.as_dict() for s in self.sites]}


PARALLAX_FORMS = ("covariance", "streaming")
_LAST: BackendReport | None = None
logger = logging.getLogger(__name__)


def last_report() -> BackendReport | None:
    """The report of the last graph the backend compiled in this process (None before any)."""
    return _LAST


def _placeholder_values(gm: fx.GraphModule, example_inputs) -> list:
    vals = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    if len(vals) == len(example_inputs) and all(v is not None for v in vals):
        return vals
    return list(example_inputs)


def to_aten(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """Dynamo's torch-level graph -> the pre-dispatch ATen graph (no decompositions, symbolic sizes
    kept), traced under the fake mode Dynamo traced with."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = _placeholder_values(gm, example_inputs)
    fake_mode = next((t.fake_mode for t in inputs if isinstance(t, torch._subclasses.FakeTensor)), None)
    if fake_mode is None:
        fake_mode = detect_fake_mode(example_inputs) or torch._subclasses.FakeTensorMode()
        inputs = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    with torch.fx.traceback.preserve_node_meta(), fake_mode:
        return make_fx(gm, pre_dispatch=True, tracing_mode="real")(*inputs)


def run_passes(aten_gm: fx.GraphModule, example_inputs=None) -> BackendReport:
    """Rewrite hand-written Parallax in ``aten_gm`` in place; return the report (also what
    :func:`last_report` returns from now on). ``example_inputs``
    (real tensors, in placeholder order) let the causal check read lifted buffers."""
    report = BackendReport()
    report.counters = {"op": 0, "covariance": 0, "streaming": 0, "skipped": 0, "softmax": 0}
    report.counters["op"] = sum(1 for n in aten_gm.graph.nodes
                                if n.op == "call_function" and n.target is torch.ops.parallax.attention.default)
    inputs = None
    if example_inputs is not None:
        holders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
        inputs = {n: t for n, t in zip(holders, example_inputs)
                  if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor)
                  and not t.requires_grad}
    report.sites = find_parallax(aten_gm, inputs)
    # The candidate region and the op are compared in float64 whatever the graph's dtype, so the
    # bar is fp32's (far above float64 rounding, far below any formula that is not Parallax): a
    # bf16 graph must not lower it to bf16's 1.6e-2 (which accepted `o1*(1+c) - 0.995*o2`).
    tol = TOLERANCE[torch.float32]
    for site in report.sites:
        if site.form not in PARALLAX_FORMS:
            report.counters["softmax"] += 1
        elif site.status == "skipped" and site.reason is not None and not site.nodes:
            report.counters["skipped"] += 1
        elif rewrite_parallax(aten_gm, site, tol):
            report.counters[site.form] += 1
        else:
            report.counters["skipped"] += 1
    drop_dead_code(aten_gm.graph)
    aten_gm.graph.lint()
    aten_gm.recompile()
    report.num_nodes = len(aten_gm.graph.nodes)
    global _LAST
    _LAST = report
    return report


def parallax_backend(gm: fx.GraphModule, example_inputs, *, mode: str | None = None, options: dict | None = None):
    """Dynamo backend: ATen graph -> Parallax passes -> Inductor (``compile_fx``), for inference
    and training.

    ``mode`` and ``options`` are what ``torch.compile(..., backend="parallax", mode=..., options=...)``
    passes on: Inductor's mode presets (``"max-autotune"``...) and Inductor config overrides.
    """
    global _LAST
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    from . import op as _op  # noqa: F401 - registers torch.ops.parallax.*

    patches = {}
    if mode is not None:
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(options or {})
    counters["parallax"]["graphs"] += 1
    try:
        aten_gm = to_aten(gm, example_inputs)
        report = run_passes(aten_gm, example_inputs)
    except Exception as exc:  # noqa: BLE001 - never fail the user's compile on a pass error
        # Dynamo's graph as it is: parallax.attention nodes are still single opaque nodes.
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        _LAST = BackendReport(note=f"passes not run ({type(exc).__name__}: {first}); compiled as captured")
        logger.warning("parallax backend: %s", _LAST.note)
        counters["parallax"]["failed_passes"] += 1
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    for key, n in report.counters.items():
        counters["parallax"][key] += n
    logger.info("parallax backend: %s", report.summary())
    for site in report.sites:
        logger.debug("parallax backend: %s", site.as_dict())
    return compile_fx(aten_gm, example_inputs, config_patches=patches or None)
