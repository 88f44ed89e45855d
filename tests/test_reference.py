"""Pin every identity of SPEC section 2 (and the mask conventions of section 5) on the float64
oracles in :mod:`parallax_compile.reference`.

Every test draws fresh random inputs under its own ``torch.manual_seed`` (never zeros, so an
identity cannot hold by accident) and works in float64. The oracles for Parallax (covariance
form), the effective weights, and LLA (ridge regression through ``D + 1`` normal equations) are
independent formulas: agreeing with one another is the check.
"""

from __future__ import annotations

import math

import pytest
import torch

from parallax_compile.reference import (
    allowed_keys,
    attention_logits,
    effective_weights_ref,
    lla_attention_ref,
    lla_probe_ref,
    parallax_attention_ref,
    softmax_attention_ref,
    softmax_weights,
)

F64 = torch.float64


def _inputs(seed, b=2, hq=4, hkv=2, lq=7, lk=9, d=5, dv=None, r_scale=0.5):
    """Random ``q, r [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]`` in float64."""
    torch.manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, lq, d, dtype=F64)
    r = r_scale * torch.randn(b, hq, lq, d, dtype=F64)
    k = torch.randn(b, hkv, lk, d, dtype=F64)
    v = torch.randn(b, hkv, lk, dv, dtype=F64)
    return q, r, k, v


def _rep(x, hq):
    return x.repeat_interleave(hq // x.shape[1], dim=1)


# Masking configurations shared by several identities: (id, kwargs, lq, lk).
CONFIGS = [
    pytest.param(dict(), 7, 9, id="full"),
    pytest.param(dict(causal=True), 9, 9, id="causal-square"),
    pytest.param(dict(causal=True), 4, 9, id="causal-Lq<Lk"),
    pytest.param(dict(causal=True), 9, 6, id="causal-Lq>Lk"),
    pytest.param(dict(window_size=3), 8, 8, id="window3"),
    pytest.param(dict(causal=True, window_size=3), 6, 10, id="causal-window3"),
]


# --- r = 0 is softmax attention, exactly ------------------------------------------------------


@pytest.mark.parametrize("kw, lq, lk", CONFIGS)
def test_zero_probe_is_softmax_exactly(kw, lq, lk):
    q, r, k, v = _inputs(0, lq=lq, lk=lk)
    out = parallax_attention_ref(q, torch.zeros_like(r), k, v, **kw)
    ref = softmax_attention_ref(q, k, v, **kw)
    assert torch.equal(out, ref), (out - ref).abs().max()
    # the nonzero probe really changes the output (the test above is not vacuous)
    assert (parallax_attention_ref(q, r, k, v, **kw) - ref).abs().max() > 1e-3


# --- effective weights --------------------------------------------------------------------------


@pytest.mark.parametrize("kw, lq, lk", CONFIGS)
def test_effective_weights_sum_to_one_and_give_output(kw, lq, lk):
    q, r, k, v = _inputs(1, lq=lq, lk=lk, r_scale=1.0)
    a = effective_weights_ref(q, r, k, **kw)
    keep = allowed_keys(lq, lk, causal=kw.get("causal", False), window_size=kw.get("window_size"))
    nonempty = keep.any(-1)
    row_sum = a.sum(-1)
    torch.testing.assert_close(
        row_sum[..., nonempty], torch.ones_like(row_sum[..., nonempty]), rtol=0, atol=1e-12
    )
    # empty rows (causal with Lq > Lk) are all zero; disallowed keys get weight exactly 0
    assert torch.equal(row_sum[..., ~nonempty], torch.zeros_like(row_sum[..., ~nonempty]))
    assert torch.equal(a.masked_fill(keep, 0), torch.zeros_like(a))
    # unlike softmax weights they leave [0, 1]
    assert (a < 0).any() and (a > 1).any()
    # o = A @ v is Parallax (covariance form)
    out = a @ _rep(v, q.shape[1])
    torch.testing.assert_close(out, parallax_attention_ref(q, r, k, v, **kw), rtol=0, atol=1e-12)


def test_effective_weights_with_zero_probe_are_softmax_weights():
    q, _, k, _ = _inputs(2)
    a = effective_weights_ref(q, torch.zeros_like(q), k, causal=True)
    assert torch.equal(a, softmax_weights(attention_logits(q, k, causal=True)))


# --- key translation ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw, lq, lk", CONFIGS)
def test_key_translation_invariance(kw, lq, lk):
    q, r, k, v = _inputs(3, lq=lq, lk=lk)
    torch.manual_seed(33)
    t = 3.0 * torch.randn(k.shape[-1], dtype=F64)
    out = parallax_attention_ref(q, r, k, v, **kw)
    moved = parallax_attention_ref(q, r, k + t, v, **kw)
    torch.testing.assert_close(moved, out, rtol=0, atol=1e-11)
    # the softmax weights are invariant too (q.t is constant along a row) ...
    s = softmax_weights(attention_logits(q, k, **kw))
    s_moved = softmax_weights(attention_logits(q, k + t, **kw))
    torch.testing.assert_close(s_moved, s, rtol=0, atol=1e-12)
    # ... but the raw probe scores g = r.k are not: the centring in C_vk is what cancels them
    g, g_moved = r @ _rep(k, q.shape[1]).mT, r @ _rep(k + t, q.shape[1]).mT
    assert (g_moved - g).abs().max() > 1e-2


def test_key_translation_per_kv_head():
    """A different shift per (batch, KV head) is still a translation of that head's keys."""
    q, r, k, v = _inputs(4, hq=6, hkv=3)
    torch.manual_seed(44)
    t = torch.randn(k.shape[0], k.shape[1], 1, k.shape[-1], dtype=F64)
    torch.testing.assert_close(
        parallax_attention_ref(q, r, k + t, v, causal=True),
        parallax_attention_ref(q, r, k, v, causal=True),
        rtol=0,
        atol=1e-11,
    )


# --- LLA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ridge", [0.3, 2.0], ids=["ridge0.3", "ridge2"])
@pytest.mark.parametrize("kw, lq, lk", CONFIGS)
def test_parallax_with_lla_probe_is_lla(kw, lq, lk, ridge):
    q, _, k, v = _inputs(5, lq=lq, lk=lk)
    rho = lla_probe_ref(q, k, ridge=ridge, **kw)
    out = parallax_attention_ref(q, rho, k, v, **kw)
    lla = lla_attention_ref(q, k, v, ridge=ridge, **kw)
    torch.testing.assert_close(out, lla, rtol=0, atol=1e-10)
    # LLA really differs from softmax here
    assert (lla - softmax_attention_ref(q, k, v, **kw)).abs().max() > 1e-3


def test_parallax_with_lla_probe_is_lla_with_mask_and_dv():
    q, _, k, v = _inputs(6, hq=4, hkv=1, lq=5, lk=8, d=4, dv=3)
    torch.manual_seed(66)
    bias = torch.randn(1, 4, 5, 8, dtype=F64)
    rho = lla_probe_ref(q, k, ridge=0.7, attn_mask=bias)
    torch.testing.assert_close(
        parallax_attention_ref(q, rho, k, v, attn_mask=bias),
        lla_attention_ref(q, k, v, ridge=0.7, attn_mask=bias),
        rtol=0,
        atol=1e-10,
    )


@pytest.mark.parametrize("kw, lq, lk", CONFIGS)
def test_huge_ridge_is_softmax(kw, lq, lk):
    q, _, k, v = _inputs(7, lq=lq, lk=lk)
    soft = softmax_attention_ref(q, k, v, **kw)
    lla = lla_attention_ref(q, k, v, ridge=1e8, **kw)
    assert (lla - soft).abs().max() < 1e-6
    rho = lla_probe_ref(q, k, ridge=1e8, **kw)
    assert (parallax_attention_ref(q, rho, k, v, **kw) - soft).abs().max() < 1e-6


# --- mask conventions (SPEC section 5) ----------------------------------------------------------


def test_causal_is_end_aligned():
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed_keys(2, 5, causal=True), expected)
    # Lq > Lk: the first Lq - Lk rows see no key at all
    expected = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]], dtype=torch.bool)
    assert torch.equal(allowed_keys(5, 2, causal=True), expected)
    assert torch.equal(allowed_keys(4, 4, causal=True), torch.ones(4, 4, dtype=torch.bool).tril())


def test_causal_reference_uses_end_alignment():
    q, r, k, v = _inputs(8, lq=2, lk=5)
    keep = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(
        parallax_attention_ref(q, r, k, v, causal=True),
        parallax_attention_ref(q, r, k, v, attn_mask=keep),
        rtol=0,
        atol=0,
    )
    # row 0 ignores the last key entirely: changing it changes only row 1
    k2, v2 = k.clone(), v.clone()
    k2[..., -1, :] += 1.0
    v2[..., -1, :] += 1.0
    a = parallax_attention_ref(q, r, k, v, causal=True)
    b = parallax_attention_ref(q, r, k2, v2, causal=True)
    assert torch.equal(a[..., 0, :], b[..., 0, :])
    assert (a[..., 1, :] - b[..., 1, :]).abs().max() > 1e-3


def test_sliding_window_pattern():
    t = torch.tensor
    # causal W=2: keys (i-2, i] = {i-1, i}
    expected = t(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(allowed_keys(5, 5, causal=True, window_size=2), expected)
    # non-causal W=2: |i - j| < 2
    expected = t(
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(allowed_keys(5, 5, window_size=2), expected)
    # the window is aligned like causal: Lq=2, Lk=6, W=3 -> rows at positions 4 and 5
    expected = t([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed_keys(2, 6, causal=True, window_size=3), expected)
    # W=1 causal: each row sees only its own key, so softmax attention returns v itself
    _, _, k, v = _inputs(9, lq=6, lk=6)
    q = torch.randn(2, 2, 6, 5, dtype=F64)
    torch.testing.assert_close(softmax_attention_ref(q, k, v, causal=True, window_size=1), v, rtol=0, atol=0)


def test_window_reference_uses_pattern():
    q, r, k, v = _inputs(10, lq=7, lk=7)
    keep = allowed_keys(7, 7, window_size=3)
    torch.testing.assert_close(
        parallax_attention_ref(q, r, k, v, window_size=3),
        parallax_attention_ref(q, r, k, v, attn_mask=keep),
        rtol=0,
        atol=0,
    )


def test_fully_masked_row_is_zero():
    q, r, k, v = _inputs(11, lq=5, lk=6)
    keep = torch.rand(5, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[2] = False
    keep[0, 0] = True
    out = parallax_attention_ref(q, r, k, v, attn_mask=keep)
    assert torch.equal(out[..., 2, :], torch.zeros_like(out[..., 2, :]))
    assert out.isfinite().all()
    assert (out[..., [0, 1, 3, 4], :].abs() > 0).all()
    assert torch.equal(
        softmax_attention_ref(q, k, v, attn_mask=keep)[..., 2, :], torch.zeros_like(out[..., 2, :])
    )
    assert torch.equal(
        effective_weights_ref(q, r, k, attn_mask=keep)[..., 2, :], torch.zeros(2, 4, 6, dtype=F64)
    )
    lla = lla_attention_ref(q, k, v, ridge=0.5, attn_mask=keep)
    assert torch.equal(lla[..., 2, :], torch.zeros_like(lla[..., 2, :]))
    # the same through an additive -inf mask and through causal with Lq > Lk
    add = torch.zeros(5, 6, dtype=F64).masked_fill(~keep, -math.inf)
    assert torch.equal(
        parallax_attention_ref(q, r, k, v, attn_mask=add)[..., 2, :], torch.zeros_like(out[..., 2, :])
    )
    out = parallax_attention_ref(*_inputs(12, lq=6, lk=4), causal=True)
    assert torch.equal(out[..., :2, :], torch.zeros_like(out[..., :2, :]))
    assert (out[..., 2:, :].abs() > 0).all()


@pytest.mark.parametrize("shape", [(5, 6), (1, 4, 5, 6), (2, 1, 5, 6), (2, 4, 5, 6)], ids=str)
def test_bool_mask_equals_additive_inf_mask(shape):
    q, r, k, v = _inputs(13, lq=5, lk=6)
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[..., 0] = True  # no empty rows, so the comparison is on real values
    add = torch.zeros(shape, dtype=F64).masked_fill(~keep, -math.inf)
    for fn in (
        lambda m: parallax_attention_ref(q, r, k, v, attn_mask=m),
        lambda m: softmax_attention_ref(q, k, v, attn_mask=m),
        lambda m: effective_weights_ref(q, r, k, attn_mask=m),
        lambda m: lla_attention_ref(q, k, v, ridge=0.5, attn_mask=m),
    ):
        torch.testing.assert_close(fn(keep), fn(add), rtol=0, atol=1e-14)
    assert (
        parallax_attention_ref(q, r, k, v, attn_mask=keep) - parallax_attention_ref(q, r, k, v)
    ).abs().max() > 1e-3


def test_additive_mask_is_added_to_scaled_logits():
    q, _, k, _ = _inputs(14, lq=3, lk=4)
    bias = torch.randn(3, 4, dtype=F64)
    logits = attention_logits(q, k, scale=0.3, attn_mask=bias)
    expected = 0.3 * q @ _rep(k, q.shape[1]).mT + bias
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("hq, hkv", [(4, 2), (6, 3), (4, 1)], ids=["gqa2", "gqa3", "mqa"])
def test_gqa_equals_explicit_per_head(hq, hkv):
    """Query head h reads KV head h // (Hq // Hkv): checked head by head, not through repeat."""
    q, r, k, v = _inputs(15, hq=hq, hkv=hkv, lq=6, lk=7)
    out = parallax_attention_ref(q, r, k, v, causal=True)
    group = hq // hkv
    for h in range(hq):
        j = h // group
        one = parallax_attention_ref(
            q[:, h : h + 1], r[:, h : h + 1], k[:, j : j + 1], v[:, j : j + 1], causal=True
        )
        torch.testing.assert_close(out[:, h : h + 1], one, rtol=0, atol=1e-14)
    rep = parallax_attention_ref(q, r, _rep(k, hq), _rep(v, hq), causal=True)
    torch.testing.assert_close(out, rep, rtol=0, atol=0)
    torch.testing.assert_close(
        lla_attention_ref(q, k, v, ridge=0.5),
        lla_attention_ref(q, _rep(k, hq), _rep(v, hq), ridge=0.5),
        rtol=0,
        atol=1e-14,
    )


def test_default_scale_and_probe_not_scaled():
    """``scale`` defaults to D**-0.5 and multiplies only q.k, never the probe scores r.k."""
    q, r, k, v = _inputs(16, d=9)
    torch.testing.assert_close(
        parallax_attention_ref(q, r, k, v), parallax_attention_ref(q, r, k, v, scale=9**-0.5), rtol=0, atol=0
    )
    # scale folded into q leaves the output unchanged (r is not touched by the temperature)
    torch.testing.assert_close(
        parallax_attention_ref(q, r, k, v, scale=0.7),
        parallax_attention_ref(0.7 * q, r, k, v, scale=1.0),
        rtol=0,
        atol=1e-13,
    )
    assert (
        parallax_attention_ref(q, r, k, v, scale=0.7) - parallax_attention_ref(q, 0.7 * r, k, v, scale=0.7)
    ).abs().max() > 1e-3
