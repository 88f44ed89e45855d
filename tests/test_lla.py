"""Local Linear Attention: the example model (every solver and statistics spelling) against the
float64 reference, recognition of every catalogued LLA form (causal + GQA, non-causal + MHA),
calibrated conversion (better than W_R = 0, reported as approximate), the gated probe's forward
and gradients, the refusal of a site that is not the LLA it looks like, softmax layers that use
their weights otherwise keeping a correct reason, the one-line capture error for lstsq, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from parallax_compile.calibrate import fit_lla_probe, text_calibration
from parallax_compile.cli import main
from parallax_compile.convert import run_conversion
from parallax_compile.models import load_model
from parallax_compile.models.lla import Block, LLAConfig, build_lla_model, lla_core
from parallax_compile.models.text import byte_tokens
from parallax_compile.passes.capture import capture
from parallax_compile.passes.match import find_sites
from parallax_compile.reference import (
    allowed_keys,
    lla_attention_ref,
    lla_cg_attention_ref,
    lla_probe_ref,
    parallax_attention_ref,
)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


DIRECT = ["solve", "solve_ex", "cholesky", "triangular", "inv", "lu"]
LOOPS = {"cg": "cg", "jacobi": "jacobi", "richardson": "richardson"}


@pytest.mark.parametrize("moments", ["flatten", "einsum", "outer", "centred"])
@pytest.mark.parametrize("solver", DIRECT + list(LOOPS))
def test_model_core_matches_reference(solver, moments):
    """The example's LLA, each spelling (as a model writes it) == the float64 oracle: GQA, causal
    and non-causal, odd sizes; the loops == the oracle of the same loop with the same steps."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 11, 5, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 11, 5, generator=g, dtype=torch.float64) for _ in range(2))
    for keep in (allowed_keys(11, 11, causal=True), None):
        got = lla_core(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), ridge=0.3, solver=solver,
                       cg_iters=3, keep=keep, moments=moments, omega=0.2)
        if solver in DIRECT:
            want = lla_attention_ref(q, k, v, ridge=0.3, attn_mask=keep)
        else:
            rho = lla_probe_ref(q, k, ridge=0.3, attn_mask=keep, cg_iters=3, loop=LOOPS[solver], omega=0.2)
            want = parallax_attention_ref(q, rho, k, v, attn_mask=keep)
            assert _rel(got, lla_attention_ref(q, k, v, ridge=0.3, attn_mask=keep)) > 1e-4  # 3 < D steps
        assert _rel(got, want) < 1e-10
    if solver == "cg":
        assert _rel(want, lla_cg_attention_ref(q, k, v, ridge=0.3, cg_iters=3)) < 1e-12


class LLAStack(nn.Module):
    """Byte embeddings and one LLA block per config: a model whose layers write LLA differently."""

    def __init__(self, configs):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(256, configs[0].n_embd)
        self.h = nn.ModuleList(Block(c) for c in configs)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return x


# (solver, statistics spelling): every catalogued form, the two (einsum + cholesky_solve, inv).
CAUSAL_GQA = [("solve", "flatten"), ("solve_ex", "einsum"), ("cholesky", "einsum"), ("triangular", "centred"),
              ("inv", "outer"), ("lu", "flatten"), ("cg", "centred"), ("jacobi", "einsum"),
              ("richardson", "flatten")]
NONCAUSAL_MHA = [("cholesky", "flatten"), ("inv", "einsum"), ("lu", "centred"), ("jacobi", "outer"),
                 ("cg", "einsum"), ("richardson", "centred")]


@pytest.mark.parametrize("causal,n_kv_head,spellings", [(True, 2, CAUSAL_GQA), (False, 4, NONCAUSAL_MHA)],
                         ids=["causal-gqa", "noncausal-mha"])
def test_every_spelling_is_recognised_and_converted(causal, n_kv_head, spellings):
    """Each layer a different spelling and lambda: each reported as LLA with its solver form, the
    right lambda (and iteration count), GQA and mask; converted with a calibrated probe whose
    held-out error (and W_R = 0's) is reported."""
    configs = [LLAConfig(block_size=16, n_embd=32, head_dim=8, n_head=4, n_kv_head=n_kv_head, solver=solver,
                         moments=moments, ridge=0.25 + 0.125 * i, cg_iters=3, omega=0.25, causal=causal)
               for i, (solver, moments) in enumerate(spellings)]
    model = LLAStack(configs).eval()
    example = {"idx": byte_tokens(12, batch_size=2)}
    calibration = [{"idx": byte_tokens(12, batch_size=2, seed=10 + 2 * j)} for j in range(3)]
    gm, info = run_conversion(model, example, dynamic=False, calibration=calibration)
    assert [s.module_path for s in info.sites] == [f"h.{i}.attn" for i in range(len(spellings))]
    for s, c in zip(info.sites, configs):
        label = f"{s.module_path} ({c.solver}, {c.moments})"
        assert s.form == f"lla-{c.solver}", label
        assert s.ridge == pytest.approx(c.ridge), label
        assert s.cg_iterations == (3 if c.solver in LOOPS else None), label
        assert s.nodes.get("lla_omega") == (0.25 if c.solver == "richardson" else None), label
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, n_kv_head, 8), label
        assert s.gqa == ("repeat_interleave" if n_kv_head < 4 else "none"), label
        assert s.mask.startswith("bool drop") if causal else s.mask == "none", label
        assert s.rewritable and s.reason is None and s in info.approximate, label
        assert s.fit["lla_match_error"] < 1e-4, label
        assert s.fit["held_out_tokens"] > 0, label
        assert 0 < s.fit["output_error_calibrated"] and 0 < s.fit["output_error_zero"] <= 1, label
        best = min(s.fit["output_error_calibrated"], s.fit["output_error_zero"])
        assert s.max_error == pytest.approx(best), label
    assert not any(n.target in (torch.ops.aten.linalg_solve.default, torch.ops.aten.linalg_inv.default)
                   for n in gm.graph.nodes)
    assert 0 < info.lla_output_error < float("inf")


@pytest.mark.parametrize("solver", ["solve", "cg"])
def test_recognition_extracts_lambda(solver):
    model = build_lla_model(solver, n_layer=2, ridge=0.37, cg_iters=6)
    sites = find_sites(capture(model, {"idx": byte_tokens(24, batch_size=2)}).gm)
    assert [s.module_path for s in sites] == ["h.0.attn", "h.1.attn"]
    for s in sites:
        assert s.form == ("lla-solve" if solver == "solve" else "lla-cg")
        assert s.ridge == pytest.approx(0.37)
        assert s.cg_iterations == (None if solver == "solve" else 6)
        assert (s.num_heads, s.num_kv_heads, s.head_dim, s.gqa) == (4, 2, 16, "repeat_interleave")
        assert s.scale == pytest.approx(0.25)
        assert s.mask.startswith("bool drop")
        assert s.reason is None


def test_calibrated_conversion_beats_zero_init():
    model = build_lla_model("solve", n_layer=1)
    example = {"idx": byte_tokens(32, batch_size=4)}
    ref = model(**example).detach()
    gm, info = run_conversion(model, example, calibration=text_calibration(example, n_tokens=2048))
    (site,) = info.sites
    assert site.rewritable and site.form == "lla-solve" and site in info.approximate
    fit = site.fit
    assert fit["probe_init"] == "calibrated"
    assert fit["lla_match_error"] < 1e-4  # the recognised lambda reproduces the site
    assert fit["held_out_tokens"] > 0 and fit["calibration_tokens"] > fit["held_out_tokens"]
    assert fit["output_error_calibrated"] < fit["output_error_zero"]
    assert fit["rho_error_least_squares"] < 1.0
    assert info.lla_output_error < info.lla_output_error_zero
    # The report is what the module computes: model outputs vs the LLA model, then at W_R = 0.
    probe = gm.get_parameter(site.probe)
    assert probe.abs().sum() > 0
    with torch.no_grad():
        assert _rel(gm(**example), ref) == pytest.approx(info.lla_output_error, rel=1e-4)
        probe.zero_()
        assert _rel(gm(**example), ref) == pytest.approx(info.lla_output_error_zero, rel=1e-4)


def test_unfaithful_site_is_not_converted(monkeypatch):
    """A site that is not the LLA read from the graph (here: lambda misread as twice its value) is
    refused with the reason, never rewritten; a 2-step CG is converted faithfully (the probe target
    is the CG's own rho, not the exact solve's)."""
    example = {"idx": byte_tokens(24, batch_size=2)}
    model = build_lla_model("cg", n_layer=1, cg_iters=2)
    _, info = run_conversion(model, example, probe_init="zero")
    (site,) = info.sites
    assert site.rewritable and site.cg_iterations == 2 and site.fit["lla_match_error"] < 1e-5

    from parallax_compile.passes import lla as lla_pass

    for name in ("_ridge_in_matrix", "_ridge_in_matvecs"):
        real = getattr(lla_pass, name)
        monkeypatch.setattr(lla_pass, name, lambda *a, _f=real: (None if _f(*a) is None else 2 * _f(*a)))
    gm, info = run_conversion(model, example, probe_init="zero")
    (site,) = info.sites
    assert not site.rewritable and "differs from LLA" in site.reason
    assert not any(n.target is torch.ops.parallax.attention.default for n in gm.graph.nodes)
    assert _rel(gm(**example), model(**example)) < 1e-6


class NotLLA(nn.Module):
    """Softmax attention whose weights also feed weighted key statistics, used otherwise than LLA:
    ``"newton"``: ``mu_v - C_vk C_kk (mu_k - q)`` (second moments, no solve); ``"wrong_rhs"``: a
    ridge solve with ``q`` as right-hand side (not ``mu_k - q``); ``"returns"``: plain attention
    that also returns its weights."""

    def __init__(self, kind: str, d: int = 8, h: int = 2):
        super().__init__()
        self.kind, self.d, self.h = kind, d, h
        self.qkv = nn.Linear(h * d, 3 * h * d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        s = torch.softmax(q @ k.transpose(-2, -1) * self.d ** -0.5, dim=-1)
        mu_v = s @ v
        if self.kind == "returns":
            return mu_v, s
        mu_k = s @ k
        c_kk = torch.einsum("bhij,bhjd,bhje->bhide", s, k, k) - mu_k.unsqueeze(-1) * mu_k.unsqueeze(-2)
        c_vk = torch.einsum("bhij,bhjd,bhje->bhide", s, v, k) - mu_v.unsqueeze(-1) * mu_k.unsqueeze(-2)
        if self.kind == "newton":
            rho = (c_kk @ (mu_k - q).unsqueeze(-1)).squeeze(-1)
        else:
            rho = torch.linalg.solve(c_kk + 0.5 * torch.eye(self.d), q.unsqueeze(-1)).squeeze(-1)
        return mu_v - (c_vk @ rho.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("kind", ["newton", "wrong_rhs", "returns"])
def test_softmax_with_other_uses_of_its_weights_is_not_lla(kind):
    """Not mistaken for LLA: skipped as a softmax site with the reason that applies, never converted."""
    model = NotLLA(kind).eval()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3))
    gm, info = run_conversion(model, (x,), dynamic=False, probe_init="zero")
    (site,) = info.sites
    assert site.form == "softmax" and site.ridge is None and not site.rewritable
    if kind == "returns":
        assert "returned as attentions" in site.reason
    elif kind == "newton":
        assert "feed 3 other computation(s) besides P @ V" in site.reason and "returned" not in site.reason
    else:
        assert "linear solve (lla-solve)" in site.reason and "not LLA" in site.reason
    assert not any(n.target is torch.ops.parallax.attention.default for n in gm.graph.nodes)
    for a, b in zip(torch.utils._pytree.tree_leaves(gm(x)), torch.utils._pytree.tree_leaves(model(x))):
        assert torch.equal(a, b)


def test_lstsq_capture_error_is_one_line_with_the_workaround():
    model = build_lla_model("lstsq", n_layer=1, head_dim=8, n_embd=32)
    with pytest.raises(RuntimeError) as exc:
        capture(model, {"idx": byte_tokens(12, batch_size=2)})
    msg = str(exc.value)
    assert "\n" not in msg and "`aten.linalg_lstsq.default` has no meta kernel" in msg
    assert "workaround: for a square (ridge) system write torch.linalg.solve" in msg


def test_inspect_table_shows_solver_form_lambda_and_iterations():
    from rich.console import Console

    from parallax_compile.cli import sites_table

    model = build_lla_model("richardson", n_layer=1, head_dim=8, n_embd=32, cg_iters=4, omega=0.25,
                            ridge=0.75)
    sites = find_sites(capture(model, {"idx": byte_tokens(12, batch_size=2)}, dynamic=False).gm)
    console = Console(width=400, record=True)
    console.print(sites_table(sites, "t"))
    assert "lla-richardson (lambda=0.75, 4 iterations, omega=0.25)" in console.export_text()


def test_calibrated_probe_sets_the_gain_to_one():
    """With the per-head gain parametrisation, a calibrated W_R is installed with r_gain = 1
    (r = W_R x approximates the solve); without a calibrated probe the gain is 0."""
    from parallax_compile.calibrate import _set_gain

    root = nn.Module()
    root.attn = nn.Module()
    root.attn.r_proj_1 = nn.Linear(4, 4, bias=False)
    root.attn.r_gain_1 = nn.Parameter(torch.zeros(2))
    _set_gain(root, "attn.r_proj_1", True)
    assert torch.equal(root.attn.r_gain_1, torch.ones(2))
    _set_gain(root, "attn.r_proj_1", False)
    assert torch.equal(root.attn.r_gain_1, torch.zeros(2))
    _set_gain(root, "attn.r_proj", True)  # no gain next to this probe: nothing to set


def _reference_forward(model, idx, w_r, w_g):
    """The example LM with each LLA layer replaced by float64 Parallax (reference formula) and the
    gated probe r = sigmoid(w_g . x) * W_R x, written out from the model's own modules."""
    b, t = idx.shape
    x = model.wte(idx) + model.wpe(torch.arange(t))
    for blk in model.h:
        a, c = blk.attn, blk.attn.c
        h = blk.ln_1(x)
        q = a.q_proj(h).view(b, t, c.n_head, c.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        gate = torch.sigmoid(h @ w_g.T)  # [B, T, H]: one gate per head
        r = ((h @ w_r.T).view(b, t, c.n_head, c.head_dim) * gate[..., None]).transpose(1, 2)
        y = parallax_attention_ref(q, r, k, v, attn_mask=a.tril[:t, :t])
        x = x + a.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        x = x + blk.mlp(blk.ln_2(x))
    return model.lm_head(model.ln_f(x))


def test_gated_probe_forward_and_gradients_match_reference():
    model = build_lla_model("solve", n_layer=1, block_size=32).double()
    example = {"idx": byte_tokens(13, batch_size=2)}
    gm, info = run_conversion(model, example, probe="gated", probe_init="zero")
    (site,) = info.sites
    assert site.rewritable
    w_r, w_g = gm.get_parameter(site.probe), gm.get_parameter(site.probe.replace("r_proj.weight", "r_proj_gate.weight"))
    assert w_g.shape == (4, 64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w_r.copy_(0.2 * torch.randn(w_r.shape, generator=g, dtype=w_r.dtype))
        w_g.copy_(torch.randn(w_g.shape, generator=g, dtype=w_g.dtype))
        gm.get_parameter(site.probe.replace("r_proj.weight", "r_gain")).fill_(1.0)  # the reference has no gain
    direction = torch.randn(2, 13, 256, generator=g, dtype=torch.float64)
    out = gm(**example)
    got = torch.autograd.grad((out * direction).sum(), [w_r, w_g, model.h[0].attn.q_proj.weight])
    ref_w = [w_r.detach().clone().requires_grad_(True), w_g.detach().clone().requires_grad_(True)]
    ref = _reference_forward(model, example["idx"], *ref_w)
    want = torch.autograd.grad((ref * direction).sum(), ref_w + [model.h[0].attn.q_proj.weight])
    assert _rel(out, ref) < 1e-10
    for a, b, name in zip(got, want, ("W_R", "w_g", "W_Q")):
        assert _rel(a, b) < 1e-8, name
    # The gate matters: all gates -> 1 doubles r relative to the gate at 0 (sigmoid 1/2).
    assert _rel(want[1], torch.zeros_like(want[1])) > 0


def test_fit_lla_probe_recovers_a_linear_probe():
    """Ridge least squares: rho that *is* linear in x is recovered; shapes are checked."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 7, generator=g, dtype=torch.float64)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    assert _rel(fit_lla_probe(x, x @ w.T, probe_ridge=1e-10), w) < 1e-6
    with pytest.raises(ValueError, match="x must be"):
        fit_lla_probe(x, x[:10])


def test_cli_inspect_lists_lla_sites_with_lambda():
    assert load_model("lla-cg").model.config.solver == "cg"
    result = CliRunner().invoke(main, ["inspect", "lla-cg", "--seq-len", "24", "--json"])
    assert result.exit_code == 0, result.output
    sites = json.loads(result.output)
    assert [(s["form"], s["ridge"], s["cg_iterations"]) for s in sites] == [("lla-cg", 0.5, 8)] * 2
    assert all(s["fit"]["lla_match_error"] < 1e-2 for s in sites)


def test_text_calibration_batches():
    """--calibration-text: UTF-8 bytes cut into batches shaped like the example token ids."""
    example = {"idx": byte_tokens(10, batch_size=3), "flag": False}
    text = "Local linear attention solves a ridge system per query. " * 20
    batches = text_calibration(example, text, n_tokens=90)
    assert len(batches) == 3
    (args, kw) = batches[1]
    assert args == () and kw["flag"] is False and kw["idx"].shape == (3, 10) and kw["idx"].dtype == torch.long
    assert bytes(kw["idx"].reshape(-1).tolist()) == text.encode()[30:60]
    # No token ids to replace: the example inputs themselves.
    assert text_calibration({"x": torch.randn(2, 3)}, text)[0][1]["x"].shape == (2, 3)
    with pytest.raises(ValueError, match="empty"):
        text_calibration(example, "")
