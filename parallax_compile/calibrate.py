"""Calibrated probes for LLA sites: start ``W_R`` where the solve was, not at zero (SPEC section 2).

With the solved probe ``rho_i = (C_kk,i + lambda I)^-1 (mu_k,i - q_i)`` Parallax's output
``mu_v - C_vk rho`` *is* LLA's, exactly. A learned probe ``r_i = W_R x_i`` can only approximate
``rho_i`` (it sees the block input ``x_i``, not the context statistics), so converting an LLA site
is approximate by nature. Two least-squares fits of ``W x_i ~ rho_i`` on calibration tokens
(every query head at once: the rows of ``W_R`` are the heads' features):

1. :func:`fit_lla_probe`, plain ridge least squares,
   ``argmin_W sum_i ||W x_i - rho_i||^2 + alpha ||W||_F^2`` (``alpha = probe_ridge * tr(X^T X) / d_in``):
   reported, not installed -- it weighs every direction of ``rho`` alike;
2. the installed probe: the same approximation measured through ``C_vk``, i.e. the site's output
   error ``sum_i ||C_vk,i (W x_i - rho_i)||^2`` (+ a small ridge), by L-BFGS from ``W = 0``.

The report (``site.fit``) gives, on *held-out* tokens, the relative RMS error ``||a - b|| / ||b||``
of ``rho`` and of the site's output (calibrated, least squares, and at ``W_R = 0``); a fit that does
not beat ``W_R = 0`` at the output is not installed. :func:`calibrate_lla_sites` does this for the
sites of a conversion (called by :func:`parallax_compile.convert.run_conversion`).

Calibration data: a list of model inputs (same structure as the example inputs) or a callable
returning one; :func:`token_batches` / :func:`text_calibration` cut a token stream (the bytes of a
text file, or the package's built-in prose) into such inputs. The statistics are materialised per
query (``[B, H, L, Dv, D]`` in float64): keep calibration batches modest (thousands of tokens).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

from .passes.capture import Capture, _split_inputs
from .passes.rewrite import gain_path
from .reference import cross_covariance_ref, lla_probe_ref

__all__ = [
    "LLA_MATCH_TOLERANCE",
    "PROBE_INITS",
    "calibrate_lla_sites",
    "fit_lla_probe",
    "text_calibration",
    "token_batches",
]

PROBE_INITS = ("calibrated", "zero")
LLA_MATCH_TOLERANCE = 1e-3
"""Max relative RMS difference between a site's output and float64 LLA with the ``lambda`` (and,
for a CG loop, the iteration count) read from the graph; above it the site is not converted (the
recognition is not trusted). Measured on fp32 sites: solve 4e-7, 8-step CG 6e-5 (CG amplifies
rounding)."""


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fit_lla_probe(x: Tensor, rho: Tensor, *, probe_ridge: float = 1e-3) -> Tensor:
    """Ridge least-squares probe: ``x [N, d_in]`` block inputs, ``rho [N, F]`` targets (the solved
    probes of every head, flattened in the query projection's feature order) -> ``W_R [F, d_in]``
    in float64. ``probe_ridge`` scales the penalty relative to the mean eigenvalue of ``x^T x``."""
    if x.dim() != 2 or rho.dim() != 2 or x.shape[0] != rho.shape[0]:
        raise ValueError(f"fit_lla_probe: x must be [N, d_in] and rho [N, F] with the same N; got "
                         f"{tuple(x.shape)} and {tuple(rho.shape)}")
    x, rho = x.double(), rho.double()
    gram = x.T @ x
    alpha = probe_ridge * gram.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + alpha * eye, x.T @ rho).T


def token_batches(example_inputs, tokens: Tensor, n_batches: int = 4) -> list:
    """Calibration inputs cut from a 1-D token stream: copies of ``example_inputs`` whose single
    2-D integer tensor (the token ids, ``[B, L]``) is replaced by consecutive windows of
    ``tokens``. Raises ``ValueError`` when the inputs have no such tensor or ``tokens`` is too short."""
    args, kwargs = _split_inputs(example_inputs)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    ids = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.dim() == 2 and not t.is_floating_point()]
    if len(ids) != 1:
        raise ValueError("token_batches: the example inputs need exactly one 2-D integer tensor (token ids); "
                         f"found {len(ids)}; pass calibration inputs yourself")
    b, n = leaves[ids[0]].shape
    if tokens.numel() < b * n:
        raise ValueError(f"token_batches: need at least {b * n} tokens for one [{b}, {n}] batch, got {tokens.numel()}")
    n_batches = min(n_batches, tokens.numel() // (b * n))
    out = []
    for j in range(n_batches):
        new = list(leaves)
        new[ids[0]] = tokens[j * b * n:(j + 1) * b * n].reshape(b, n).to(leaves[ids[0]])
        a, k = pytree.tree_unflatten(new, spec)
        out.append((tuple(a), dict(k)))
    return out


def text_calibration(example_inputs, text: str | None = None, n_tokens: int = 8192) -> list:
    """Calibration inputs from real text as UTF-8 byte ids (byte-level models such as the built-in
    ``lla`` / ``nanogpt``): about ``n_tokens`` tokens of ``text``, or by default of prose from
    :mod:`parallax_compile.models.text` (Python's reference manual, always on disk), in batches
    shaped like the example token ids (the last batch is held out). See :func:`token_batches`.
    Inputs without exactly one 2-D integer tensor (no token ids) give ``[example_inputs]``."""
    args, kwargs = _split_inputs(example_inputs)
    ids = [t for t in pytree.tree_leaves((args, kwargs))
           if isinstance(t, Tensor) and t.dim() == 2 and not t.is_floating_point()]
    if len(ids) != 1:
        return [(args, kwargs)]  # no token ids to replace: calibrate on the example inputs
    per_batch = ids[0].numel()
    n_batches = max(2, -(-n_tokens // max(per_batch, 1)))
    if text is None:
        from .models.text import sample_text

        text = sample_text(max(per_batch, 1) * n_batches, seed=1234)
    data = text.encode("utf-8")
    if not data:
        raise ValueError("text_calibration: the calibration text is empty")
    return token_batches(example_inputs, torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), n_batches)


class _Values(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def _record(gm, inputs, wanted) -> dict:
    args, kwargs = _split_inputs(inputs)
    rec = _Values(gm, set(wanted))
    with torch.no_grad():
        rec.run(*pytree.tree_leaves((args, kwargs)))
    return rec.values


def _merge(values: list[dict], held: list[Tensor]) -> tuple[list[dict], list[Tensor]]:
    """One batch out of several recorded calibration inputs when their shapes agree (one fit step
    sees them all): values batched like the inputs (rank >= 3, dim 0 = the batch) are concatenated,
    the others (a mask shared or broadcast over the batch) must be equal across inputs."""
    if len(values) < 2:
        return values, held
    batch = held[0].shape[0]
    merged = {}
    for n, v0 in values[0].items():
        vs = [vals[n] for vals in values]
        if not all(isinstance(v, Tensor) and v.shape == v0.shape for v in vs):
            return values, held
        if v0.dim() >= 3 and v0.shape[0] == batch:
            merged[n] = torch.cat(vs)
        elif all(torch.equal(v, v0) for v in vs):
            merged[n] = v0
        else:
            return values, held
    return [merged], [torch.cat(held)]


def _op_node(out: fx.Node) -> fx.Node:
    n = out
    while n.target is not torch.ops.parallax.attention.default:
        n = n.args[0]
    return n


def _held_out(values: list[dict], node) -> list[Tensor]:
    """Bool ``[B, L]`` per calibration input: the held-out query positions (the last input when
    there are several; else the second half of the rows, or every fourth position of a single row)."""
    masks = []
    for j, vals in enumerate(values):
        b, lq = vals[node].shape[0], vals[node].shape[-2]
        m = torch.zeros(b, lq, dtype=torch.bool)
        if len(values) > 1:
            m[:] = j == len(values) - 1
        elif b > 1:
            m[b // 2:] = True
        else:
            m[:, 3::4] = True
        masks.append(m)
    return masks


def calibrate_lla_sites(cap: Capture, gm: fx.GraphModule, sites, added: dict, chains: dict, *,
                        probe_init: str = "calibrated", calibration=None, probe_ridge: float = 1e-3,
                        refine_steps: int = 30) -> dict[int, str]:
    """Fit (or zero) the probe of every LLA site in ``sites`` and fill ``site.fit``.

    ``gm`` must currently route each LLA site's users to its *original* output (so every site sees
    the original model's activations); ``added[id(site)] = (new nodes, probe path)``. Returns
    ``{id(site): reason}`` for the sites that must not be converted (the recognised LLA does not
    reproduce the site's output). ``calibration``: ``None`` (the captured example inputs), a list
    of inputs, or a callable returning one. ``refine_steps``: L-BFGS iterations of the output fit
    that follows the least-squares fit (0: least squares only).
    """
    if probe_init not in PROBE_INITS:
        raise ValueError(f"probe_init must be one of {PROBE_INITS}, got {probe_init!r}")
    inputs = calibration() if callable(calibration) else calibration
    inputs = list(inputs) if inputs is not None else [(cap.args, cap.kwargs)]
    if not inputs:
        raise ValueError("calibration: no calibration inputs")
    ops = {id(s): _op_node(added[id(s)][0]["out"]) for s in sites}
    wanted = set()
    for s in sites:
        op = ops[id(s)]
        wanted |= {chains[id(s)].x, s.nodes["out"], *[a for a in op.args[:5] if isinstance(a, fx.Node)]}
    values = [_record(gm, inp, wanted) for inp in inputs]
    plain = _plain_head_splits(gm, sites, ops, chains, added, inputs[0])
    rejected = {}
    for s in sites:
        reason = _calibrate_site(gm, s, ops[id(s)], chains[id(s)], added[id(s)][1], values, plain[id(s)],
                                 probe_init, probe_ridge, refine_steps)
        if reason:
            rejected[id(s)] = reason
    return rejected


def _calibrate_site(gm, site, op, chain, path, values, plain, probe_init, probe_ridge,
                    refine_steps) -> str | None:
    q_n, r_n, k_n, v_n, m_n = op.args[:5]
    kw = _op_kw(op, site)
    values, held = _merge(values, _held_out(values, q_n))
    held = [h.to(vals[q_n].device) for h, vals in zip(held, values)]
    lla_err, rho_all, o_all, lin = [], [], [], []
    for vals in values:
        q, k = vals[q_n].double(), vals[k_n].double()
        mask = vals[m_n] if isinstance(m_n, fx.Node) else None
        mask = mask.double() if mask is not None and mask.is_floating_point() else mask
        rho = _site_probe(site, q, k, mask, kw)
        mu_v, c_vk = cross_covariance_ref(q, k, vals[v_n].double(), attn_mask=mask, **kw)
        o = _parallax(mu_v, c_vk, rho)
        lla_err.append(_rel(o, vals[site.nodes["out"]].double().reshape(o.shape)))
        rho_all.append(rho)
        o_all.append(o)
        lin.append((mu_v, c_vk))
    match = max(lla_err)
    fit: dict[str, Any] = {"probe_init": probe_init, "lla_match_error": match,
                           "calibration_tokens": int(sum(h.numel() - h.sum() for h in held)),
                           "held_out_tokens": int(sum(h.sum() for h in held))}
    if site.nodes.get("lla_omega") is not None:
        fit["omega"] = site.nodes["lla_omega"]
    site.fit = fit
    if not match <= LLA_MATCH_TOLERANCE:
        # Not LLA after all (another use of the key statistics, or a misread lambda): it stays the
        # softmax site it is, with what was tried in the reason.
        reason = (f"its weights feed key statistics and a linear solve ({site.form}), but the output "
                  f"differs from LLA with lambda={site.ridge:g} by {match:.2e} (relative RMS, above "
                  f"{LLA_MATCH_TOLERANCE:g}): not LLA, not converted")
        site.form, site.ridge, site.cg_iterations = "softmax", None, None
        return reason
    probe = gm.get_submodule(path)
    gate = _gate(gm, path)
    d_in = probe.weight.shape[1]
    if not plain:
        fit["note"] = ("calibration needs the probe to be a plain head split of the query projection "
                       "(no rotary embedding or per-head norm on q); the probe starts at zero")
        fit["probe_init"] = "zero"
    xs, xs_fit, rho_fit, xs_held, rho_held = [], [], [], [], []
    for vals, rho, h in zip(values, rho_all, held):
        x = vals[chain.x].double().reshape(h.shape[0], h.shape[1], d_in)
        tgt = rho.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)  # [B, L, H*D]: head-major features
        xs.append(x)
        xs_fit.append(x[~h]), rho_fit.append(tgt[~h]), xs_held.append(x[h]), rho_held.append(tgt[h])
    w = None
    if plain and probe_init == "calibrated":
        w = fit_lla_probe(torch.cat(xs_fit), torch.cat(rho_fit), probe_ridge=probe_ridge)
        fit["rho_error_least_squares"] = _rel(torch.cat(xs_held) @ w.T, torch.cat(rho_held))
        fit["output_error_least_squares"] = _held_error(lin, held, xs, w, o_all)
        if refine_steps:
            w = _refine(lin, held, xs, w, o_all, refine_steps, torch.cat(rho_fit).pow(2).sum())
        fit["rho_error_calibrated"] = _rel(torch.cat(xs_held) @ w.T, torch.cat(rho_held))
    fit["rho_error_zero"] = 1.0
    fit["output_error_zero"] = _held_error(lin, held, xs, None, o_all)
    if w is not None:
        fit["output_error_calibrated"] = _held_error(lin, held, xs, w, o_all)
        if not fit["output_error_calibrated"] < fit["output_error_zero"]:
            fit["note"] = "the calibrated probe did not beat r = 0 on held-out tokens; the probe starts at zero"
            fit["probe_init"], w = "zero", None
    site.max_error = fit["output_error_calibrated"] if w is not None else fit["output_error_zero"]
    with torch.no_grad():
        if w is not None:
            # With the gate at its initial value sigmoid(0) = 1/2, W_R = 2 W gives r = W x.
            probe.weight.copy_((w * (2.0 if gate is not None else 1.0)).to(probe.weight))
        elif _gain(gm, path) is None:
            probe.weight.zero_()
        # else: r = 0 through the gain; W_R keeps its random init (W_R = 0 and gain = 0 would give
        # both zero gradients: a probe that never trains).
        _set_gain(gm, path, w is not None)
    return None


def _gain(gm, path: str) -> Tensor | None:
    """The per-head probe gain ``r_gain [Hq]`` next to ``W_R`` (``<owner>.r_proj`` ->
    ``<owner>.r_gain``, ``r_proj_1`` -> ``r_gain_1``), or None (no gain parametrisation)."""
    owner, _, name = gain_path(path).rpartition(".")
    gain = getattr(gm.get_submodule(owner) if owner else gm, name, None)
    return gain if isinstance(gain, Tensor) else None


def _set_gain(gm, path: str, calibrated: bool) -> None:
    """``r_gain`` = 1 when the fitted ``W_R`` is installed (``r = W_R x`` approximates the solve),
    else 0 (the site starts as softmax attention)."""
    gain = _gain(gm, path)
    if gain is not None:
        with torch.no_grad():
            gain.fill_(1.0 if calibrated else 0.0)


LOOPS = {"lla-cg": "cg", "lla-jacobi": "jacobi", "lla-richardson": "richardson"}


def _site_probe(site, q: Tensor, k: Tensor, mask, kw: dict) -> Tensor:
    """The probe the site's solver computes, in float64: the exact ridge solve (every direct
    solver form), or the unrolled loop's iterations (CG, Jacobi, Richardson with its ``omega``)."""
    loop = LOOPS.get(site.form)
    if loop is None:
        return lla_probe_ref(q, k, ridge=site.ridge, attn_mask=mask, **kw)
    return lla_probe_ref(q, k, ridge=site.ridge, attn_mask=mask, cg_iters=site.cg_iterations, loop=loop,
                         omega=site.nodes.get("lla_omega"), **kw)


def _gate(gm, path):
    try:
        return gm.get_submodule(f"{path}_gate")
    except AttributeError:
        return None


def _plain_head_splits(gm, sites, ops, chains, added, inputs) -> dict[int, bool]:
    """``{id(site): plain}``: whether each site's replayed chain maps ``W x`` to ``r`` by a plain
    head split (feature ``h * D + d`` -> ``r[:, h, :, d]``; rotary embeddings or per-head norms are
    not), checked by one run of the graph with a random ``W`` in every probe (and the gains, if
    any, at 1). The LLA sites' users read their original outputs meanwhile, so the probes change
    nothing but ``r``."""
    saved, p = {}, {}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        try:
            for s in sites:
                path = added[id(s)][1]
                probe, gain = gm.get_submodule(path), _gain(gm, path)
                saved[path] = (probe.weight.detach().clone(),
                               gain.detach().clone() if gain is not None else None)
                w = torch.randn(probe.weight.shape, generator=gen, dtype=probe.weight.dtype)
                p[id(s)] = w.to(probe.weight.device)
                probe.weight.copy_(p[id(s)])
                if gain is not None:
                    gain.fill_(1.0)
            wanted = {n for s in sites for n in (ops[id(s)].args[0], ops[id(s)].args[1], chains[id(s)].x)}
            got = _record(gm, inputs, wanted)
        finally:
            for path, (w, g) in saved.items():
                gm.get_submodule(path).weight.copy_(w)
                if g is not None:
                    _gain(gm, path).copy_(g)
    out = {}
    for s in sites:
        q, r, x = got[ops[id(s)].args[0]], got[ops[id(s)].args[1]], got[chains[id(s)].x]
        if x.dim() != 3 or q.dim() != 4 or tuple(x.shape[:2]) != (q.shape[0], q.shape[2]):
            out[id(s)] = False
            continue
        gate = _gate(gm, added[id(s)][1])
        want = (0.5 if gate is not None else 1.0) * (x @ p[id(s)].T)
        want = want.reshape(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
        out[id(s)] = tuple(r.shape) == tuple(want.shape) and _rel(r.double(), want.double()) < 1e-4
    return out


def _op_kw(op: fx.Node, site) -> dict:
    return {"scale": site.scale, "causal": bool(op.args[6]), "window_size": op.args[7]}


def _parallax(mu_v: Tensor, c_vk: Tensor, r: Tensor) -> Tensor:
    """Parallax's output ``mu_v - C_vk r`` (SPEC section 2) from precomputed statistics."""
    return mu_v - (c_vk @ r.unsqueeze(-1)).squeeze(-1)


def _probe(x: Tensor, w: Tensor, c_vk: Tensor) -> Tensor:
    """``r = W x`` as the op's ``[B, H, L, D]`` (head-major features, the plain head split)."""
    b, h, lq, _, d = c_vk.shape
    return (x @ w.T).reshape(b, lq, h, d).transpose(1, 2)


REFINE_PENALTY = 0.1
"""Weight of ``||W x||^2 / ||rho||^2`` (over calibration tokens) in the output fit: keeps the probe
small where the outputs do not pin it (fewer calibration tokens than the probe has parameters)."""


def _refine(lin, held, xs, w0, o_ref, steps, rho_norm2) -> Tensor:
    """``W x ~ rho`` measured where it matters: minimise ``sum_i ||C_vk,i (W x_i - rho_i)||^2`` (the
    site's output error, linear in ``W``: a convex least-squares problem) plus a small ridge, by
    L-BFGS from ``W = 0`` (shaped like ``w0``). Plain least squares on ``rho`` weighs every
    direction alike, while the output sees ``r`` only through ``C_vk``, which is largest exactly
    where the solve shrinks ``rho`` most: on real calibration data that fit is often worse than
    ``W = 0`` at the output, so it is reported (``rho_error_least_squares``,
    ``output_error_least_squares``) but not installed."""
    w = torch.zeros_like(w0).requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    den = sum(o.transpose(1, 2)[~h].pow(2).sum() for o, h in zip(o_ref, held)).clamp_min(1e-300)

    def closure():
        opt.zero_grad()
        loss, size = 0.0, 0.0
        for (mu_v, c_vk), h, x, o in zip(lin, held, xs, o_ref):
            out = _parallax(mu_v, c_vk, _probe(x, w, c_vk))
            loss = loss + (out - o).transpose(1, 2)[~h].pow(2).sum()
            size = size + (x[~h] @ w.T).pow(2).sum()
        loss = loss / den + REFINE_PENALTY * size / rho_norm2
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _held_error(lin, held, xs, w, o_ref) -> float:
    """Relative RMS error of the site's output on held-out tokens with the probe ``r = W x`` (or
    ``r = 0`` when ``w`` is None) against LLA, in float64 (the Parallax op matches this formula
    within SPEC section 5's tolerances)."""
    num, den = 0.0, 0.0
    for (mu_v, c_vk), h, x, o in zip(lin, held, xs, o_ref):
        out = mu_v if w is None else _parallax(mu_v, c_vk, _probe(x, w, c_vk))
        a, b = out.transpose(1, 2)[h], o.transpose(1, 2)[h]
        num += (a - b).pow(2).sum().item()
        den += b.pow(2).sum().item()
    return math.sqrt(num / max(den, 1e-300))
