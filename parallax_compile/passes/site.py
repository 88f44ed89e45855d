"""``AttentionSite``: one attention found in a model, as the passes and the report see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx


@dataclass
class MaskTerm:
    """One contribution to the logits between ``QK^T`` and the softmax.

    ``kind``: ``"add"`` (``coef * node`` added to the logits), ``"keep"`` (boolean, True = keep),
    ``"drop"`` (boolean, True = masked out) or ``"set"`` (a fill: the logits are *set* to ``coef``
    where the boolean ``node`` holds, where it does not when ``negate``; ``coef`` is NaN when the
    value is not a constant). ``node == "causal_top_left"`` stands for SDPA's top-left causal mask
    when ``Lq != Lk``. ``scores``: when the term is added after a reshape of the scores (Bloom:
    ``[B * H, Lq, Lk]`` viewed as ``[B, H, Lq, Lk]``), that reshape's node: the term is broadcast
    to its shape and reshaped like ``QK^T`` (``site.nodes["scores"]``).
    """

    kind: str
    node: Any
    coef: float = 1.0
    negate: bool = False
    scores: Any = None


@dataclass
class AttentionSite:
    """An attention site found in the ATen graph of a model.

    Public fields describe it for people (``parallax-compile inspect``) and tests; the graph
    handles (``nodes``) are for the rewrite.
    """

    module_path: str
    """Owning module, e.g. ``model.layers.0.self_attn`` (from ``nn_module_stack``)."""
    form: str
    """Pattern matched: ``sdpa`` or ``softmax(matmul)`` / ``softmax(bmm)`` / ``softmax(einsum)``."""
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    scale: float | None = None
    """Softmax temperature on ``q . k`` (None = ``head_dim ** -0.5``)."""
    causal: bool = False
    """End-aligned causal flag passed to the op (SDPA ``is_causal`` with ``Lq == Lk``)."""
    mask: str = "none"
    """Human-readable description of the mask/bias terms."""
    gqa: str = "none"
    """How K/V heads are shared: ``none``, ``enable_gqa``, ``repeat_kv``, ``repeat_interleave``."""
    query_chain: list[str] = field(default_factory=list)
    """The ops from the block input ``x`` to ``q`` (projection, reshapes, norm, rotary)."""
    rewritable: bool = False
    reason: str | None = None
    """Why the site is not rewritten (None when it is)."""
    probe: str | None = None
    """State-dict name of the probe weight ``W_R``, e.g. ``model.layers.0.self_attn.r_proj.weight``."""
    max_error: float | None = None
    """Max abs error of the site's output at ``W_R = 0``, relative to the output's max abs value."""
    ridge: float | None = None
    """LLA sites only (forms ``lla-*``, catalogued in :mod:`.lla`): the ridge ``lambda`` read from
    the graph."""
    cg_iterations: int | None = None
    """``lla-cg`` / ``lla-jacobi`` / ``lla-richardson`` sites: the loop's iterations unrolled in the graph."""
    fit: dict[str, Any] | None = None
    """LLA sites only: the conversion is approximate; the calibrated probe's fit report
    (:func:`parallax_compile.calibrate.fit_lla_probe`: ``probe_init``, relative errors of ``rho``
    and of the site output on held-out tokens, calibrated and at ``W_R = 0``)."""
    nodes: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    mask_terms: list[MaskTerm] = field(default_factory=list, repr=False, compare=False)

    @property
    def status(self) -> str:
        if self.rewritable and self.fit is not None:
            return f"rewritten approximately (LLA, {self.fit.get('probe_init')} probe)"
        return "rewritten" if self.rewritable else f"skipped: {self.reason}"

    def skip(self, reason: str) -> AttentionSite:
        self.rewritable, self.reason = False, reason
        return self

    def as_dict(self) -> dict[str, Any]:
        keys = (
            "module_path", "form", "num_heads", "num_kv_heads", "head_dim", "scale", "causal", "mask",
            "gqa", "query_chain", "rewritable", "reason", "probe", "max_error", "ridge", "cg_iterations", "fit",
        )
        return {k: getattr(self, k) for k in keys}


def owner_path(node: fx.Node) -> str:
    """Innermost module path from ``nn_module_stack`` (``""`` for the root module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return path or ""
