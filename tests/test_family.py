"""The attention family (SPEC section 2): its limits against the float64 reference, the op
configuration of each member against the reference, and the CG form of LLA."""

from __future__ import annotations

import math

import pytest
import torch

from parallax_compile.family import (
    AFFINE_LINEAR,
    PARALLAX,
    SOFTMAX,
    FamilyMember,
    family_attention,
    family_attention_ref,
    lla,
)
from parallax_compile.reference import (
    allowed_keys,
    lla_attention_ref,
    lla_cg_attention_ref,
    lla_probe_ref,
    softmax_attention_ref,
)

F64 = torch.float64


def _inputs(b=2, hq=4, hkv=2, lq=7, lk=9, d=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q, r = (torch.randn(b, hq, lq, d, generator=g, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, lk, d, generator=g, dtype=dtype) for _ in range(2))
    return q, 0.3 * r, k, v


def _causal_mask(lq, lk):
    return allowed_keys(lq, lk, causal=True)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = {
    "plain": {},
    "causal-mask": {"attn_mask": "causal"},
    "additive-mask": {"attn_mask": "additive"},
}


def _kw(case, q, k):
    kw = dict(CASES[case])
    if kw.get("attn_mask") == "causal":
        kw["attn_mask"] = _causal_mask(q.shape[-2], k.shape[-2])
    elif kw.get("attn_mask") == "additive":
        g = torch.Generator().manual_seed(5)
        kw["attn_mask"] = torch.randn(q.shape[-2], k.shape[-2], generator=g, dtype=q.dtype)
    return kw


@pytest.mark.parametrize("case", CASES)
def test_solved_probe_gives_lla_exactly(case):
    """Parallax with the solved probe == LLA as weighted ridge regression (normal equations)."""
    q, _, k, v = _inputs(seed=1)
    kw = _kw(case, q, k)
    got = family_attention_ref(q, k, v, lla(0.37), **kw)
    want = lla_attention_ref(q, k, v, ridge=0.37, **kw)
    assert _rel(got, want) < 1e-10
    assert _rel(got, softmax_attention_ref(q, k, v, **kw)) > 1e-2  # LLA is not softmax here


@pytest.mark.parametrize("case", CASES)
def test_ridge_to_infinity_gives_softmax(case):
    q, _, k, v = _inputs(seed=2)
    kw = _kw(case, q, k)
    soft = softmax_attention_ref(q, k, v, **kw)
    errs = [_rel(family_attention_ref(q, k, v, lla(ridge), **kw), soft) for ridge in (1e2, 1e4, 1e8)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-7
    assert _rel(lla_attention_ref(q, k, v, ridge=1e8, **kw), soft) < 1e-7


def test_zero_probe_is_softmax_exactly():
    q, _, k, v = _inputs(seed=3)
    m = _causal_mask(7, 9)
    assert torch.equal(family_attention_ref(q, k, v, SOFTMAX, attn_mask=m),
                       family_attention_ref(q, k, v, PARALLAX, torch.zeros_like(q), attn_mask=m))
    assert _rel(family_attention_ref(q, k, v, SOFTMAX, attn_mask=m), softmax_attention_ref(q, k, v, attn_mask=m)) < 1e-14


@pytest.mark.parametrize("causal", [False, True])
def test_uniform_weights_give_affine_linear_attention(causal):
    """bandwidth -> inf: mean over the allowed keys minus the *uniform* covariance times r,
    written out here independently (loops over rows, explicit covariance matrices)."""
    q, r, k, v = _inputs(seed=4)
    got = family_attention_ref(q, k, v, AFFINE_LINEAR, r, causal=causal)
    keep = allowed_keys(7, 9, causal=causal)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    want = torch.empty_like(got)
    for i in range(7):
        kj, vj = kr[:, :, keep[i]], vr[:, :, keep[i]]  # [B, H, n_i, D]
        mk, mv = kj.mean(2), vj.mean(2)
        cov = torch.einsum("bhjv,bhjd->bhvd", vj - mv[:, :, None], kj - mk[:, :, None]) / kj.shape[2]
        want[:, :, i] = mv - torch.einsum("bhvd,bhd->bhv", cov, r[:, :, i])
    assert _rel(got, want) < 1e-12
    # ... and it is the limit of a growing bandwidth
    near = family_attention_ref(q, k, v, FamilyMember(bandwidth=1e7, probe="learned"), r, causal=causal)
    assert _rel(near, want) < 1e-6


def test_without_intercept_weights_do_not_sum_to_one():
    q, r, k, v = _inputs(seed=6)
    no_int = FamilyMember(probe="learned", intercept=False)
    ones = torch.ones_like(v)
    want = torch.ones_like(q)
    # Effective weights applied to a constant value: affine -> exactly 1; linear -> 1 - c_i.
    assert torch.allclose(family_attention_ref(q, k, ones, PARALLAX, r), want, atol=1e-12)
    assert not torch.allclose(family_attention_ref(q, k, ones, no_int, r), want, atol=1e-3)


MEMBERS = {
    "softmax": (SOFTMAX, False),
    "parallax": (PARALLAX, True),
    "parallax-T2": (FamilyMember(bandwidth=2.0, probe="learned"), True),
    "affine-linear": (AFFINE_LINEAR, True),
    "no-intercept": (FamilyMember(probe="learned", intercept=False), True),
    "lla": (lla(0.5), False),
}


@pytest.mark.parametrize("name", MEMBERS)
def test_op_configuration_matches_reference(name):
    """Each member through the single op node: output and every gradient vs float64."""
    member, learned = MEMBERS[name]
    q, r, k, v = _inputs(b=1, hq=4, hkv=2, lq=6, lk=6, d=4, seed=7, dtype=torch.float32)
    mask = _causal_mask(6, 6)
    leaves = [q, k, v] + ([r] if learned else [])
    for t in leaves:
        t.requires_grad_(True)
    out = family_attention(q, k, v, member, r if learned else None, attn_mask=mask)
    up = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = family_attention_ref(up[0], up[1], up[2], member, up[3] if learned else None, attn_mask=mask)
    assert _rel(out.double(), ref) < 1e-5
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    got = torch.autograd.grad((out * g.float()).sum(), leaves)
    want = torch.autograd.grad((ref * g).sum(), up)
    for a, b, nm in zip(got, want, "qkvr"):  # (dq is exactly 0 at infinite bandwidth)
        assert (a.double() - b).norm() <= 1e-4 * b.norm() + 1e-12, nm


def test_cg_form_converges_to_lla():
    q, _, k, v = _inputs(seed=9, d=6)
    m = _causal_mask(7, 9)
    exact = lla_attention_ref(q, k, v, ridge=0.5, attn_mask=m)
    errs = [_rel(lla_cg_attention_ref(q, k, v, ridge=0.5, cg_iters=n, attn_mask=m), exact) for n in (1, 3, 6)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-9  # exact after D steps
    assert errs[0] > 1e-3
    rho = lla_probe_ref(q, k, ridge=0.5, attn_mask=m)
    assert _rel(lla_probe_ref(q, k, ridge=0.5, attn_mask=m, cg_iters=12), rho) < 1e-10


def test_member_validation():
    with pytest.raises(ValueError, match="ridge"):
        FamilyMember(probe="solved")
    with pytest.raises(ValueError, match="intercept"):
        FamilyMember(probe="solved", ridge=1.0, intercept=False)
    with pytest.raises(ValueError, match="bandwidth"):
        FamilyMember(bandwidth=0.0)
    q, _r, k, v = _inputs()
    with pytest.raises(ValueError, match="needs r"):
        family_attention_ref(q, k, v, PARALLAX)
    assert math.isinf(AFFINE_LINEAR.bandwidth)
