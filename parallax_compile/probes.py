"""The probe parametrization: what a conversion adds to a model, and how to select it.

Every converted attention site gets two new parameters on the module that owns it (SPEC section 7):

* ``<owner>.r_proj.weight`` -- the probe projection ``W_R`` ``[Hq * D, d_in]``, shaped like the
  query block of ``W_Q`` and initialised **at random like ``W_Q``** (normal, with the standard
  deviation of ``W_Q``'s entries);
* ``<owner>.r_gain`` -- one gain per query head ``[Hq]``, initialised to **zero**.

``r`` is the gain times the probe replayed through the query chain::

    r[:, h] = r_gain[h] * chain(W_R x)[:, h]        # chain: head reshape, per-head norm, RoPE

So ``r = 0`` at initialisation and the model is exactly the original softmax model, and a step
``delta`` on ``r_gain`` changes ``r`` by ``delta * chain(W_R x)``: the outputs move in proportion to
the step. A zero ``W_R`` (the first design) also gives ``r = 0``, but when the chain has a per-head
RMSNorm (Qwen3, Gemma 3) any ``W_R != 0`` is normalised to the full size of a query: the first
optimizer step switched the correction on at full strength (measured: one SGD step of lr 1e-4
moved a tiny Qwen3's logits by 120 % of their norm). This is LoRA's recipe (one factor random, one
zero): the gain receives the gradient first and ``W_R`` follows once the gain is non-zero.

A site may also carry a gate (``probe="gated"``, ``<owner>.r_proj_gate.weight``). Names ending in
``_N`` (``r_proj_1``, ``r_gain_1``) belong to a second site of the same owner.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "is_probe",
    "named_probe_parameters",
    "probe_parameters",
    "gain_name",
    "init_probe_weight",
    "new_gain",
    "apply_gain",
    "check_continuity",
]


def _stem(part: str) -> str:
    head, _, tail = part.rpartition("_")
    return head if tail.isdigit() and head else part


def is_probe(name: str) -> bool:
    """Whether a parameter name belongs to what a conversion added: ``...r_proj[_N].weight``,
    ``...r_proj[_N]_gate.weight`` or ``...r_gain[_N]``."""
    parts = name.split(".")
    if _stem(parts[-1]) == "r_gain":
        return True
    return len(parts) >= 2 and parts[-2].startswith("r_proj")


def named_probe_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter the conversion added to ``model`` (probes ``W_R``,
    gains, gates), like ``model.named_parameters()``. Use it for an optimizer group or to train
    only the probes::

        for p in model.parameters():
            p.requires_grad_(False)
        for p in parallax_compile.probe_parameters(model):
            p.requires_grad_(True)
    """
    for name, p in model.named_parameters():
        if is_probe(name):
            yield name, p


def probe_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of :func:`named_probe_parameters`, like ``model.parameters()``."""
    for _, p in named_probe_parameters(model):
        yield p


def gain_name(probe_attr: str) -> str:
    """The gain's attribute for a probe attribute: ``r_proj`` -> ``r_gain``, ``r_proj_2`` -> ``r_gain_2``."""
    return "r_gain" + probe_attr[len("r_proj"):]


def init_probe_weight(w_r: Tensor, w_q: Tensor, generator: torch.Generator | None = None) -> None:
    """Fill ``w_r`` in place with normal noise of ``w_q``'s standard deviation (``w_q``: the query
    block of ``W_Q``; any shape). ``generator``: a CPU generator (default: torch's global one)."""
    if w_r.is_meta or w_q.is_meta:  # built on the meta device (from_pretrained): the checkpoint fills it
        return
    with torch.no_grad():
        std = float(w_q.detach().float().std()) if w_q.numel() > 1 else 0.0
        if not std > 0:
            std = w_r.shape[-1] ** -0.5
        noise = torch.randn(w_r.shape, generator=generator, dtype=torch.float32)
        w_r.copy_((noise * std).to(device=w_r.device, dtype=w_r.dtype))


def new_gain(num_heads: int, like: Tensor) -> nn.Parameter:
    """A zero gain ``[num_heads]`` on ``like``'s device and dtype."""
    return nn.Parameter(torch.zeros(num_heads, device=like.device, dtype=like.dtype))


def apply_gain(r: Tensor, gain: Tensor) -> Tensor:
    """``r`` ``[B, H, L, D]`` (or ``[B * H, L, D]``, batch-major) times ``gain`` ``[H]`` per head
    (a gain of one element scales every head), in ``r``'s dtype. Under tensor parallelism the gain
    is a DTensor sharded like the heads: each rank multiplies its own heads by its local shard."""
    g = (gain.to_local() if hasattr(gain, "to_local") else gain).to(r.dtype)
    if g.numel() == 1:
        return r * g.reshape(())
    if r.dim() == 4:
        return r * g.view(1, -1, 1, 1)
    return (r.unflatten(0, (-1, g.numel())) * g.view(1, -1, 1, 1)).flatten(0, 1)


def check_continuity(run, gains: list[nn.Parameter], reference, *, eps: float | None = None) -> dict:
    """Measure that the outputs move in proportion to a small step on the gains (SPEC section 7).

    Tried at ``eps`` (default 1e-3; 1e-2 in half precision), then, when that step is not linear
    enough, at ``eps / 10``: a curved but continuous response becomes linear as the step shrinks,
    a jump does not (its change keeps its size). Returns the first result that passes, else the
    last one; see :func:`_continuity_at`."""
    low = any(g.dtype in (torch.float16, torch.bfloat16) for g in gains)
    first = eps if eps is not None else (1e-2 if low else 1e-3)
    result = _continuity_at(run, gains, reference, eps=first)
    if not result["ok"] and eps is None:
        result = _continuity_at(run, gains, reference, eps=first / 10)
    return result


def _continuity_at(run, gains: list[nn.Parameter], reference, *, eps: float | None = None) -> dict:
    """One step size of :func:`check_continuity`.

    ``run()`` returns the model's outputs (any pytree of tensors), ``reference`` those at the
    current gains (zero after a conversion). The gains are set to ``eps * u`` and ``2 * eps * u``
    (``u``: random signs per head, seeded) and restored. Returns ``{"eps", "relative_change"
    (||d1|| / ||reference||), "linearity_error" (||d2 - 2 d1|| / ||d2||), "ok"}``: ``ok`` when the
    response is finite and linear to first order (``linearity_error`` at most 0.3 in fp32/fp64,
    0.5 in half precision) -- a jump (RMSNorm's scale invariance with a zero ``W_R``) gives
    ``d2 ~ d1`` and a linearity error near 1."""
    from torch.utils import _pytree as pytree

    def floats(out):  # kept in their dtype: a language model's logits can be gigabytes
        return [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]

    low = any(g.dtype in (torch.float16, torch.bfloat16) for g in gains)
    eps = eps if eps is not None else (1e-2 if low else 1e-3)
    gen = torch.Generator().manual_seed(0)
    signs = [torch.randint(0, 2, g.shape, generator=gen).mul(2).sub(1) for g in gains]
    saved = [g.detach().clone() for g in gains]
    ref = floats(reference)
    outs = []
    try:
        with torch.no_grad():
            for step in (eps, 2 * eps):
                for g, s0, u in zip(gains, saved, signs):
                    g.copy_(s0 + step * u.to(device=g.device, dtype=g.dtype))
                outs.append(floats(run()))
    finally:
        with torch.no_grad():
            for g, s0 in zip(gains, saved):
                g.copy_(s0)
    # Sums of squares in float64, a block of 2**22 elements at a time (no full-size double copies).
    sq = {"d1": 0.0, "d2": 0.0, "ref": 0.0, "lin": 0.0}
    finite = True
    for r, a, b in zip(ref, outs[0], outs[1]):
        r, a, b = r.reshape(-1), a.reshape(-1), b.reshape(-1)
        for i in range(0, r.numel(), 1 << 22):
            rc, ac, bc = (t[i:i + (1 << 22)].double() for t in (r, a, b))
            k = torch.isfinite(rc)
            finite = finite and bool(torch.isfinite(ac[k]).all()) and bool(torch.isfinite(bc[k]).all())
            d1, d2 = torch.where(k, ac - rc, 0), torch.where(k, bc - rc, 0)
            sq["d1"] += float(d1.pow(2).sum())
            sq["d2"] += float(d2.pow(2).sum())
            sq["ref"] += float(torch.where(k, rc, 0).pow(2).sum())
            sq["lin"] += float((d2 - 2 * d1).pow(2).sum())
    n1, n2, nref = sq["d1"] ** 0.5, sq["d2"] ** 0.5, sq["ref"] ** 0.5
    lin = sq["lin"] ** 0.5 / n2 if n2 > 0 else 0.0
    ok = finite and lin <= (0.5 if low else 0.3)
    return {"eps": eps, "relative_change": n1 / nref if nref > 0 else n1, "linearity_error": lin, "ok": ok}
