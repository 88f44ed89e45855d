"""The pipeline: capture -> match -> rewrite -> verify.

``find_attention`` and ``convert`` run the same pipeline; ``find_attention`` returns the report
(every site, rewritten or skipped with its reason), ``convert`` the rewritten, trainable module.
A site is kept rewritten only when, at ``W_R = 0``, its own output and the model's outputs are
unchanged on the example inputs and the probe's gradient is finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .checks import (TOLERANCE, outputs_error, relative_error, tensor_digests, weights_digest,
                     within_fp32_rounding)
from .passes.adversarial import adversarial_variants, mask_inputs
from .passes.capture import Capture, capture, mark_specialised, original_float64, record
from .passes.match import Skip, find_sites
from .passes.query_chain import find_query_chain, locate_query_block
from .passes.rewrite import drop_dead_code, gain_path, probe_path, remove_probe, rewrite_site
from .passes.site import AttentionSite
from .probes import check_continuity, is_probe

# TOLERANCE, relative_error, is_probe and weights_digest live in .checks (re-exported here).
__all__ = ["find_attention", "convert", "run_conversion", "ConversionInfo", "relative_error", "TOLERANCE",
           "is_probe", "weights_digest"]


@dataclass
class ConversionInfo:
    """What a conversion did; attached to the converted module as ``module.meta["parallax"]``."""

    sites: list[AttentionSite]
    dynamic: bool
    note: str
    max_output_error: float | None = None
    reference_outputs: Any = field(default=None, repr=False)
    """The original model's outputs on the example inputs (what ``verify`` compares against)."""
    weights_digest: str = ""
    """sha256 of the non-probe weights at conversion: ``verify`` compares against the original
    outputs only while these are unchanged (probes-only fine-tuning)."""
    digests: dict = field(default_factory=dict, repr=False)
    """Per tensor of the converted module's ``state_dict`` (probes included), its digest
    (:func:`~parallax_compile.checks.tensor_digests`): the conversion directory records them."""
    example_args: tuple = field(default=(), repr=False)
    example_kwargs: dict = field(default_factory=dict, repr=False)
    dynamic_shapes: Any = field(default=None, repr=False)
    lla_output_error: float | None = None
    """Converted LLA sites only (approximate): relative RMS error ``||out - ref|| / ||ref||`` of the
    model's outputs against the original, with the probes as initialised (``max_output_error``
    covers the exact sites, with the LLA sites left as they were)."""
    lla_output_error_zero: float | None = None
    """The same with every LLA probe at zero, for comparison (what ``--probe-init zero`` gives)."""
    continuity: dict | None = None
    """:func:`parallax_compile.probes.check_continuity` of the exact sites' gains: the outputs'
    relative change for a step of ``eps`` on every gain, and how linear it is."""

    @property
    def approximate(self) -> list[AttentionSite]:
        """Rewritten LLA sites: converted with a fitted (not an exact) probe."""
        return [s for s in self.sites if s.rewritable and s.fit is not None]

    @property
    def rewritten(self) -> list[AttentionSite]:
        return [s for s in self.sites if s.rewritable]

    @property
    def skipped(self) -> list[AttentionSite]:
        return [s for s in self.sites if not s.rewritable]


def _tol(t: torch.Tensor) -> float:
    return TOLERANCE.get(t.dtype, 1e-5)


def _prepare(cap: Capture) -> tuple[list[AttentionSite], dict, Any]:
    sites = find_sites(cap.gm)
    chains, wanted = {}, set()
    for site in sites:
        if not site.rewritable and site.reason:
            continue
        try:
            chain = find_query_chain(cap.gm, site.nodes["q"])
        except Skip as why:
            site.skip(str(why))
            continue
        site.query_chain = chain.description
        chains[id(site)] = chain
        wanted |= chain.marker_inputs()
    ref_out, values = record(cap, cap.gm, wanted)
    for site in sites:
        chain = chains.get(id(site))
        if chain is None:
            continue
        try:
            locate_query_block(chain, values)
        except Skip as why:
            site.skip(str(why))
            chains.pop(id(site))
    return sites, chains, ref_out


def prepare_sites(cap: Capture) -> tuple[list[AttentionSite], dict, Any]:
    """Match the sites of a capture and find each one's query chain (no rewrite):
    ``(sites, {id(site): QueryChain}, original outputs)``. Used by :mod:`parallax_compile.hf`."""
    return _prepare(cap)


def _revert(gm: fx.GraphModule, site: AttentionSite, new: dict, path: str, reason: str) -> None:
    """Route the site's users back to the original attention (kept alive until the final
    dead-code elimination, which also drops the probe)."""
    new["out"].replace_all_uses_with(site.nodes["out"])
    site.probe = None
    site.skip(reason)


def run_conversion(model, example_inputs, *, dynamic_dims=None, valid_positions=None, dynamic=True,
                   probe="linear", probe_init="calibrated", calibration=None):
    """Capture, match, rewrite and verify; returns ``(converted module, ConversionInfo)``.

    ``probe``: ``"linear"`` (``r = W_R x``) or ``"gated"`` (``r = sigmoid(w_g . x) * W_R x``, one
    gate per head). LLA sites (forms ``lla-solve`` / ``lla-cg``) are converted approximately: their
    probe is fitted to LLA's solved probe (``probe_init="calibrated"``, on ``calibration`` inputs,
    default the example inputs; see :mod:`parallax_compile.calibrate`) or zero, and ``site.fit``
    reports the error instead of the exact W_R = 0 check."""
    from .calibrate import PROBE_INITS

    if probe not in ("linear", "gated"):
        raise ValueError(f"probe must be 'linear' or 'gated', got {probe!r}")
    if probe_init not in PROBE_INITS:
        raise ValueError(f"probe_init must be one of {PROBE_INITS}, got {probe_init!r}")
    cap = capture(model, example_inputs, dynamic_dims=dynamic_dims, dynamic=dynamic)
    sites, chains, ref_out = _prepare(cap)
    gm, taken, added = cap.gm, set(), {}
    for site in sites:
        chain = chains.get(id(site))
        if chain is None:
            continue
        path = probe_path(gm, site.module_path, taken)
        added[id(site)] = (rewrite_site(gm, site, chain, path, probe=probe), path)
        site.probe = f"{path}.weight"
    gm.recompile()
    # 1. Each site on its own: the op's output vs the original attention on the same inputs; r == 0.
    wanted = {n for new, _ in added.values() for n in (new["out"], new["r"])}
    wanted |= {s.nodes["out"] for s in sites if id(s) in added}
    _, values = record(cap, gm, wanted)
    for site in sites:
        if id(site) not in added:
            continue
        new, path = added[id(site)]
        if site.ridge is not None:
            continue  # LLA: approximate by nature; calibrated and reported below
        ref = values[site.nodes["out"]]
        err = relative_error(values[new["out"]], ref)
        site.max_error = err
        if not bool((values[new["r"]] == 0).all()):
            _revert(gm, site, new, path, "r is not 0 at r_gain = 0 (the replayed query chain gives a "
                    "non-finite value)")
        elif err > _tol(ref):
            _revert(gm, site, new, path, f"the Parallax op at r = 0 differs from the original "
                    f"attention by {err:.2e} (relative), above {_tol(ref):.0e}")
        else:
            site.rewritable, site.reason = True, None
    gm.recompile()
    _check_adversarial(cap, gm, [s for s in sites if s.rewritable and s.ridge is None], added)
    # 2. The whole model, with gradients: outputs unchanged and finite probe gradients (LLA sites
    # detoured to their original output meanwhile, and calibrated on the original activations).
    lla = [s for s in sites if id(s) in added and s.ridge is not None]
    for s in lla:
        added[id(s)][0]["out"].replace_all_uses_with(s.nodes["out"])
    gm.recompile()
    worst = _check_model(cap, gm, [s for s in sites if s not in lla], added, ref_out, valid_positions, model)
    continuity = _check_continuity(cap, gm, [s for s in sites if s not in lla], added, ref_out)
    lla_errors = _convert_lla(cap, gm, lla, added, chains, ref_out, valid_positions, probe_init, calibration)
    drop_dead_code(gm.graph)  # only now: a revert needs the original attention nodes
    for site in sites:
        if id(site) in added and not site.rewritable:
            remove_probe(gm, added[id(site)][1])
    gm.graph.lint()
    gm.recompile()
    mark_specialised(cap, "the conversion")  # a pass that guarded on a dynamic dim pinned it
    info = ConversionInfo(sites=sites, dynamic=cap.dynamic, note=cap.note, max_output_error=worst,
                          example_args=cap.args, example_kwargs=cap.kwargs, dynamic_shapes=cap.dynamic_shapes,
                          reference_outputs=ref_out, weights_digest=weights_digest(gm), digests=tensor_digests(gm),
                          continuity=continuity,
                          **lla_errors)
    gm.meta["parallax"] = info
    return gm, info


def _check_adversarial(cap, gm, live, added) -> None:
    """Run every rewritten site on synthesized masks (:mod:`.passes.adversarial`: fully masked rows,
    single-key rows, ``finfo.min`` rows) wherever a mask is a graph input, and revert a site whose op
    output differs from its original attention there."""
    positions = mask_inputs(gm, live)
    if not positions:
        return
    wanted = {n for s in live for n in (added[id(s)][0]["out"], s.nodes["out"])}
    for label, args, kwargs in adversarial_variants(cap.args, cap.kwargs, positions):
        variant = Capture(gm=gm, args=args, kwargs=kwargs, dynamic=cap.dynamic)
        try:
            _, values = record(variant, gm, wanted)
        except Exception:  # noqa: BLE001 - the model itself rejects such a mask: nothing to compare
            continue
        for site in live:
            if not site.rewritable:
                continue
            ref, new = values[site.nodes["out"]], values[added[id(site)][0]["out"]]
            err = relative_error(new, ref)
            if err > _tol(ref):
                _revert(gm, site, added[id(site)][0], added[id(site)][1],
                        f"on a synthesized mask input ({label}: fully masked / single-key rows) the op "
                        f"differs from the original attention by {err:.2e} (relative)")
    gm.recompile()


def _convert_lla(cap, gm, lla, added, chains, ref_out, valid_positions, probe_init, calibration) -> dict:
    """Calibrate the LLA sites' probes, route their users to the Parallax op again, and measure the
    model's outputs with the probes as initialised and at zero. Sites whose recognised LLA does not
    reproduce their output, or whose probe gradient is not finite, are reverted."""
    from .calibrate import calibrate_lla_sites

    if not lla:
        return {}
    rejected = calibrate_lla_sites(cap, gm, lla, added, chains, probe_init=probe_init, calibration=calibration)
    for s in lla:
        if id(s) in rejected:
            s.probe = None
            s.skip(rejected[id(s)])
        else:
            s.nodes["out"].replace_all_uses_with(added[id(s)][0]["out"])
            s.rewritable, s.reason = True, None
    gm.recompile()
    live = [s for s in lla if s.rewritable]
    if not live:
        return {}
    probes = {id(s): gm.get_parameter(s.probe) for s in live}
    def rms_error(new):
        pairs = [(a.detach().double(), b.double()) for a, b in zip(pytree.tree_leaves(new), pytree.tree_leaves(ref_out))
                 if isinstance(b, torch.Tensor) and b.is_floating_point()]
        den = sum(b.pow(2).sum() for _, b in pairs)
        return math.sqrt(sum((a - b).pow(2).sum() for a, b in pairs) / max(float(den), 1e-300))

    out = cap.run(gm)
    err = rms_error(out)
    floats = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    gen = torch.Generator().manual_seed(0)
    loss = sum((t @ torch.randn(t.shape[-1:], generator=gen, dtype=t.dtype).to(t.device)).sum() for t in floats)
    grads = torch.autograd.grad(loss, list(probes.values()), allow_unused=True)
    for s, g in zip(live, grads):
        if g is None or not bool(torch.isfinite(g).all()):
            _revert(gm, s, added[id(s)][0], added[id(s)][1], "the probe's gradient is not finite")
    saved = {k: p.detach().clone() for k, p in probes.items()}
    with torch.no_grad():
        for p in probes.values():
            p.zero_()
        err_zero = rms_error(cap.run(gm))
        for k, p in probes.items():
            p.copy_(saved[k])
    gm.recompile()
    return {"lla_output_error": err, "lla_output_error_zero": err_zero}


def _check_model(cap, gm, sites, added, ref_out, valid_positions, model) -> float:
    live = [s for s in sites if s.rewritable]
    if not live:
        return 0.0
    probes = {id(s): gm.get_parameter(gain_path(added[id(s)][1])) for s in live}
    out = cap.run(gm)
    worst, ok = outputs_error(out, ref_out, valid_positions)
    if not ok:  # deep fp32 models: rounding alone can exceed the tolerance (checks.within_fp32_rounding)
        ok = within_fp32_rounding(out, ref_out, original_float64(model, cap), valid_positions)
    floats = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()
              and t.requires_grad]
    bad_grad = set()
    if floats:
        gen = torch.Generator().manual_seed(0)
        # A random direction along the last dim only: no output-sized random tensor (Gemma's
        # logits alone are 1.3 GB).
        loss = sum((t @ torch.randn(t.shape[-1:], generator=gen, dtype=t.dtype).to(t.device)).sum() for t in floats)
        grads = torch.autograd.grad(loss, list(probes.values()), allow_unused=True)
        for s, g in zip(live, grads):
            if g is None or not bool(torch.isfinite(g).all()):
                bad_grad.add(id(s))
    for s in live:
        if id(s) in bad_grad:
            new, path = added[id(s)]
            _revert(gm, s, new, path, "the probe gain's gradient is missing or not finite at r = 0")
    if not ok:
        for s in live:
            if s.rewritable:
                new, path = added[id(s)]
                _revert(gm, s, new, path, f"the model's outputs changed by {worst:.2e} after rewriting")
    if bad_grad or not ok:
        gm.recompile()
        worst, _ = outputs_error(cap.run(gm), ref_out, valid_positions)
    return worst


def _check_continuity(cap, gm, sites, added, ref_out) -> dict | None:
    """A small step on the gains must move the outputs in proportion (SPEC section 7); a site whose
    own step does not is reverted."""
    live = [s for s in sites if s.rewritable]
    if not live:
        return None
    gains = {id(s): gm.get_parameter(gain_path(added[id(s)][1])) for s in live}
    result = check_continuity(lambda: cap.run(gm), list(gains.values()), ref_out)
    if result["ok"]:
        return result
    for s in live:
        own = check_continuity(lambda: cap.run(gm), [gains[id(s)]], ref_out)
        if not own["ok"]:
            new, path = added[id(s)]
            _revert(gm, s, new, path, f"a step of {own['eps']:g} on the probe gain does not change the "
                    f"outputs in proportion (linearity error {own['linearity_error']:.2f})")
    gm.recompile()
    live = [s for s in live if s.rewritable]
    return check_continuity(lambda: cap.run(gm), [gains[id(s)] for s in live], ref_out) if live else None


def find_attention(model: torch.nn.Module, example_inputs, *, dynamic_dims=None, valid_positions=None) -> list[AttentionSite]:
    """Every attention site of ``model`` (as ``torch.export`` sees it on ``example_inputs``), each
    marked ``rewritable`` or with the ``reason`` it would be skipped. The model is not changed.

    ``example_inputs``: a Tensor, a tuple of positional inputs, a dict of keyword inputs, or
    ``(args, kwargs)``. Raises ``RuntimeError`` if the model cannot be exported.
    """
    _, info = run_conversion(model, example_inputs, dynamic_dims=dynamic_dims, valid_positions=valid_positions)
    return info.sites


def convert(model: torch.nn.Module, example_inputs, *, dynamic_dims=None, valid_positions=None,
            probe: str = "linear", probe_init: str = "calibrated", calibration=None) -> fx.GraphModule:
    """Rewrite every provably equivalent attention site of ``model`` into Parallax form.

    Returns a trainable ``torch.fx.GraphModule`` called like ``model`` (same inputs and output
    structure; batch and sequence dims dynamic where the model allows). Each rewritten site gains a
    zero-initialised probe ``<owning module>.r_proj.weight`` (in ``named_parameters()`` and
    ``state_dict()``); every other parameter keeps its name. ``module.meta["parallax"]`` is a
    :class:`ConversionInfo` with the per-site report. The converted module shares its existing
    parameters with ``model`` (no copy; pass ``copy.deepcopy(model)`` to keep the original apart).
    It runs the graph captured in eval mode: dropout layers stay inactive in ``.train()``.

    Local Linear Attention sites (``site.form`` ``lla-solve`` / ``lla-cg``) are the exception to
    "provably equivalent": Parallax reproduces LLA only with the per-query solved probe, so they are
    converted *approximately*, with ``W_R`` fitted to that probe (``probe_init="calibrated"``, on
    ``calibration``: a list of inputs or a callable returning one; default the example inputs) or
    zero (``probe_init="zero"``: softmax attention). ``site.fit`` and
    ``ConversionInfo.lla_output_error`` say by how much. ``probe="gated"`` adds a per-head gate
    ``r = sigmoid(w_g . x) * W_R x`` (see :func:`~parallax_compile.passes.rewrite.rewrite_site`).
    """
    gm, _ = run_conversion(model, example_inputs, dynamic_dims=dynamic_dims, valid_positions=valid_positions,
                           probe=probe, probe_init=probe_init, calibration=calibration)
    return gm
