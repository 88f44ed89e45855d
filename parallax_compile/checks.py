"""Numeric checks shared by the conversions (:mod:`~parallax_compile.convert`, :mod:`~parallax_compile.hf`)
and the conversion directory (:mod:`~parallax_compile.conversion_dir`): output tolerances, the
relative error, which parameters are probes, and per-tensor weight digests. Imports only torch.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch
from torch.utils import _pytree as pytree

from .probes import is_probe

__all__ = ["TOLERANCE", "float64_outputs", "is_probe", "main_output", "outputs_error", "relative_error", "tensor_digests",
           "weights_digest", "within_fp32_rounding"]

# Max abs error relative to the reference's max abs value, per output dtype (fp32: the 1e-5).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def outputs_error(new, ref, valid: torch.Tensor | None = None) -> tuple[float, bool]:
    """``(worst, ok)`` over the floating-point leaves of two output pytrees: the largest
    :func:`relative_error` and whether every leaf is within ``TOLERANCE`` of its dtype."""
    worst, ok = 0.0, True
    for a, b in zip(pytree.tree_leaves(new), pytree.tree_leaves(ref)):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            err = relative_error(a, b, valid)
            worst, ok = max(worst, err), ok and err <= TOLERANCE.get(b.dtype, 1e-5)
    return worst, ok


def main_output(out) -> torch.Tensor:
    """The tensor a model's output is compared by: ``logits``, else ``last_hidden_state`` (a
    transformers ``ModelOutput``; not its KV cache), else the first tensor leaf (``out`` itself for a
    tensor)."""
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return pytree.tree_leaves(out)[0]


def within_fp32_rounding(new, ref, exact, valid: torch.Tensor | None = None) -> bool:
    """Fallback of the ``r = 0`` output checks for an fp32 model just outside ``TOLERANCE``.

    Deep models amplify rounding (Gemma 3 270M, 18 layers: 1.16e-5 between the original and the
    upgraded model, the same math in fp32 on 16 CPU threads), so the bare tolerance can refuse an
    exact conversion. ``new``: the converted model's fp32 outputs; ``ref``: the original model's fp32
    outputs on the same inputs; ``exact``: the original model's outputs computed in float64
    (:func:`float64_outputs`), or ``None`` when it cannot run in float64. True when every fp32 leaf
    of ``new`` is no farther from ``exact`` than ``ref`` is, times 1.5 (the rounding of the
    comparison itself). A real change of the outputs is larger than the original's own rounding and
    is still refused (``tests/test_rounding_fallback.py``, ``tests/test_probes.py``: a 1e-3 change is
    refused where the rounding is 8e-7).
    Leaves of another dtype than fp32 never take the fallback."""
    if exact is None:
        return False
    leaves = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves or any(t.dtype != torch.float32 for t in leaves):
        return False
    exact = pytree.tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                            exact)
    new_err, _ = outputs_error(new, exact, valid)
    old_err, _ = outputs_error(ref, exact, valid)
    return new_err <= 1.5 * old_err


def float64_outputs(module: torch.nn.Module, args, kwargs, *, outputs=lambda out: out, prepare=None):
    """``outputs(module(*args, **kwargs))`` run on a float64 deep copy of ``module`` (fp32
    parameters, buffers and inputs upcast; the module itself is not changed), under ``no_grad``;
    ``prepare(copy)`` runs first when given (the Hugging Face path removes the probes there, which
    gives back the original model). ``None`` when the copy cannot run in float64 (a dtype fixed in
    the model's code, say)."""
    def to64(t):
        return t.double() if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t

    try:
        copy64 = copy.deepcopy(module)
        if prepare is not None:
            prepare(copy64)
        copy64.double()
        with torch.no_grad():
            return outputs(copy64(*pytree.tree_map(to64, tuple(args)), **pytree.tree_map(to64, dict(kwargs))))
    except (RuntimeError, TypeError, ValueError):
        return None


def relative_error(new, ref, valid: torch.Tensor | None = None) -> float:
    """``max |new - ref| / max |ref|`` over the positions where ``ref`` is finite (and ``valid``,
    a bool ``[B, L]`` matched against the first two dims); ``inf`` when ``new`` is not finite
    where ``ref`` is. Works block by block: a language model's logits can be gigabytes."""
    new, ref = new.detach(), ref.detach()
    if ref.dim() < 2:
        new, ref = new.reshape(1, 1, -1), ref.reshape(1, 1, -1)
    use_valid = valid is not None and tuple(ref.shape[:2]) == tuple(valid.shape)
    diff, scale = 0.0, 0.0
    for b in range(ref.shape[0]):
        for i0 in range(0, ref.shape[1], 64):
            a, r = new[b, i0:i0 + 64], ref[b, i0:i0 + 64]
            if use_valid:
                rows = valid[b, i0:i0 + 64]
                a, r = a[rows], r[rows]
            keep = torch.isfinite(r)
            if bool((keep & ~torch.isfinite(a)).any()):
                return math.inf
            d = torch.where(keep, (a - r).abs(), 0)
            diff = max(diff, d.max().item() if d.numel() else 0.0)
            ra = torch.where(keep, r.abs(), 0)
            scale = max(scale, ra.max().item() if ra.numel() else 0.0)
    return diff / scale if scale > 0 else diff


def _digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def tensor_digests(module: torch.nn.Module) -> dict[str, str]:
    """``{name: sha256 (first 32 hex digits) of dtype, shape and bytes}`` for every tensor of
    ``module.state_dict()`` (parameters and persistent buffers, probes included). A conversion
    directory records these, so ``verify`` names any weight that changed after it was written."""
    return {name: _digest(t) for name, t in module.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}


def weights_digest(module: torch.nn.Module) -> str:
    """One sha256 over the names and bytes of every parameter and buffer that is not a probe."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not is_probe(name):
            h.update(name.encode())
            h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
