"""The Parallax op (``torch.ops.parallax.attention`` / :func:`parallax_attention`) against the
float64 oracle, on the portable chunked implementation.

* registration: ``torch.library.opcheck`` of the forward and backward ops, ``gradcheck`` in float64;
* accuracy: output and all gradients (q, r, k, v and a learned additive mask) for fp32 / fp16 /
  bf16 against float64 with SPEC section 5's relative-RMS tolerances, on odd sizes, GQA/MQA,
  causal with ``Lq != Lk``, windows, boolean masks with a fully masked row, additive masks;
* the query-chunk loop with a tiny block budget (many chunks, a last chunk that does not divide);
* argument validation before compute; NaN propagation and ``r = 0`` against SDPA;
* ``torch.compile`` and ``torch.export`` see exactly one op node.

The gradient oracle is autograd through the float64 covariance form
:func:`~parallax_compile.reference.parallax_attention_ref` (``tests/test_reference.py`` pins it
against the effective weights and against LLA's ridge regression). Fresh allocations are
poisoned with NaN (``torch.utils.deterministic.fill_uninitialized_memory``), so an output row the
op forgets to write cannot pass.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from parallax_compile import parallax_attention
from parallax_compile.kernels import chunked
from parallax_compile.reference import (
    allowed_keys,
    attention_logits,
    effective_weights_ref,
    parallax_attention_ref,
    softmax_attention_ref,
    softmax_weights,
)

F64 = torch.float64
OP = torch.ops.parallax.attention.default
OP_BWD = torch.ops.parallax.attention_backward.default

# SPEC section 5: relative RMS error against float64, output and every gradient.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True)
def _poison_empty():
    """``torch.empty`` & co. return NaN-filled memory for the duration of each test."""
    import torch.utils.deterministic as det

    was_det, was_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was_det)
    det.fill_uninitialized_memory = was_fill


def _qrkv(seed, b, hq, hkv, lq, lk, d, dtype=torch.float32, dv=None, grad=True):
    """Random ``q, r [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]`` made in ``dtype``.

    ``r`` is scaled by ``D**-0.5`` so that the probe scores ``g = r.k`` are O(1) like the logits.
    """
    torch.manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, lq, d).to(dtype)
    r = (torch.randn(b, hq, lq, d) * d**-0.5).to(dtype)
    k = torch.randn(b, hkv, lk, d).to(dtype)
    v = torch.randn(b, hkv, lk, dv).to(dtype)
    return [t.requires_grad_(grad) for t in (q, r, k, v)]


def _upcast(ts):
    """The same values in float64, as fresh leaves."""
    return [None if t is None else t.detach().to(F64).requires_grad_(t.requires_grad) for t in ts]


def _ref(q, r, k, v, **kw):
    """Float64 Parallax, covariance form ``o_i = mu_v_i - C_vk,i r_i`` (autograd gives the gradients)."""
    return parallax_attention_ref(q, r, k, v, **kw)


def _rel(x, ref):
    """Relative RMS error ``||x - ref|| / ||ref||`` in float64."""
    return ((x.to(F64) - ref).norm() / ref.norm()).item()


def _mask_bool(seed, shape, empty_row=None):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) > 0.3
    keep[..., 0] = True
    if empty_row is not None:
        keep[..., empty_row, :] = False
    return keep


def _mask_add(seed, shape, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).requires_grad_(grad)


# --- registration --------------------------------------------------------------------------------


def _opcheck_cases():
    """(id, [q, r, k, v], kwargs, marks for the backward opcheck)."""
    yield "plain", _qrkv(0, 1, 2, 2, 5, 5, 8), dict(), ()
    yield "causal-Lq<Lk", _qrkv(1, 1, 2, 2, 3, 6, 8), dict(causal=True), ()
    yield "causal-Lq>Lk", _qrkv(2, 1, 2, 1, 6, 3, 8), dict(causal=True), ()
    yield "gqa", _qrkv(3, 2, 4, 2, 5, 5, 8), dict(), ()
    yield "window", _qrkv(4, 1, 2, 1, 6, 6, 8), dict(window_size=2), ()
    yield "boolmask", _qrkv(5, 1, 2, 2, 5, 5, 8), dict(attn_mask=_mask_bool(5, (1, 1, 5, 5), empty_row=2)), ()
    yield "addmask-grad", _qrkv(6, 1, 2, 2, 5, 5, 8), dict(attn_mask=_mask_add(6, (1, 2, 5, 5))), ()
    yield (
        "addmask-bcast-grad",
        _qrkv(7, 2, 2, 2, 5, 5, 8),
        dict(attn_mask=_mask_add(7, (5,)), causal=True),
        (),
    )
    yield "scale-dv", _qrkv(8, 1, 2, 2, 4, 5, 8, dv=6), dict(scale=0.3), ()
    yield (
        "fp16-fp32mask",
        _qrkv(9, 1, 2, 1, 5, 6, 8, torch.float16),
        dict(attn_mask=_mask_add(9, (5, 6)), causal=True),
        (),
    )
    # [B, L, H, D] tensors seen as [B, H, L, D], as Hugging Face attention makes them
    qrkv = [t.detach().transpose(1, 2).requires_grad_() for t in _qrkv(10, 1, 5, 5, 2, 2, 8, torch.bfloat16)]
    yield "bf16-transposed", qrkv, dict(), ()
    mask = _mask_add(11, (6, 5), grad=False).t().requires_grad_()
    yield "addmask-transposed-grad", _qrkv(11, 1, 2, 2, 5, 6, 8), dict(attn_mask=mask), ()


OPCHECK_CASES = [pytest.param(*c[1:3], id=c[0]) for c in _opcheck_cases()]
OPCHECK_BWD_CASES = [pytest.param(*c[1:3], id=c[0], marks=c[3]) for c in _opcheck_cases()]


def _op_args(qrkv, kw):
    q, r, k, v = qrkv
    return (q, r, k, v, kw.get("attn_mask"), kw.get("scale"), kw.get("causal", False), kw.get("window_size"))


@pytest.mark.parametrize("qrkv, kw", OPCHECK_CASES)
def test_opcheck_forward(qrkv, kw):
    torch.library.opcheck(OP, _op_args(qrkv, kw))


@pytest.mark.parametrize("qrkv, kw", OPCHECK_BWD_CASES)
def test_opcheck_backward(qrkv, kw):
    args = _op_args(qrkv, kw)
    q, r, k, v, mask, scale, causal, window = args
    with torch.no_grad():
        out, mu_v, lse, c = OP(*args)
    torch.manual_seed(100)
    grad_out = torch.randn_like(out)
    mask_needs_grad = mask is not None and mask.requires_grad
    detached = [t.detach() for t in (q, r, k, v)]
    mask = None if mask is None else mask.detach()
    torch.library.opcheck(
        OP_BWD, (grad_out, *detached, out, mu_v, lse, c, mask, scale, causal, window, mask_needs_grad)
    )


GRADCHECK_CASES = [
    pytest.param(dict(b=1, hq=2, hkv=2, lq=4, lk=5), dict(), "add", id="plain-addmask"),
    pytest.param(dict(b=1, hq=4, hkv=2, lq=3, lk=6), dict(causal=True), "add", id="gqa-causal-Lq<Lk"),
    pytest.param(dict(b=2, hq=2, hkv=1, lq=6, lk=4), dict(causal=True), "add", id="mqa-causal-Lq>Lk"),
    pytest.param(dict(b=1, hq=2, hkv=2, lq=6, lk=6), dict(window_size=2), "add", id="window2"),
    pytest.param(
        dict(b=1, hq=4, hkv=1, lq=5, lk=7), dict(causal=True, window_size=3), None, id="mqa-causal-window3"
    ),
    pytest.param(dict(b=1, hq=2, hkv=2, lq=4, lk=5), dict(), "bool", id="boolmask-emptyrow"),
    pytest.param(
        dict(b=2, hq=2, hkv=1, lq=4, lk=5), dict(causal=True), "add-rowbcast", id="addmask-rowbcast"
    ),
]


@pytest.mark.parametrize("shape, kw, mask_kind", GRADCHECK_CASES)
def test_gradcheck_float64(shape, kw, mask_kind):
    q, r, k, v = _qrkv(10, **shape, d=3, dtype=F64)
    lq, lk = shape["lq"], shape["lk"]
    if mask_kind == "add":
        mask = _mask_add(11, (shape["b"], shape["hq"], lq, lk)).to(F64).detach().requires_grad_()
    elif mask_kind == "add-rowbcast":
        mask = _mask_add(11, (1, shape["hq"], 1, lk)).to(F64).detach().requires_grad_()
    elif mask_kind == "bool":
        mask = _mask_bool(11, (lq, lk), empty_row=1)
    else:
        mask = None
    inputs = (q, r, k, v) + ((mask,) if mask is not None and mask.requires_grad else ())

    def fn(q, r, k, v, m=mask):
        return parallax_attention(q, r, k, v, attn_mask=m, **kw)

    assert torch.autograd.gradcheck(fn, inputs)


# --- accuracy against float64 --------------------------------------------------------------------

# (b, hq, hkv, lq, lk, d, kwargs, mask kind)
CASES = [
    pytest.param(1, 4, 2, 1, 63, 64, dict(), None, id="L1-D64-gqa2"),
    pytest.param(2, 4, 1, 63, 111, 80, dict(causal=True), None, id="L63x111-D80-mqa-causal"),
    pytest.param(1, 4, 2, 111, 63, 128, dict(causal=True), None, id="L111x63-D128-gqa2-causal"),
    pytest.param(1, 2, 2, 111, 111, 64, dict(causal=True), None, id="L111-D64-causal"),
    pytest.param(1, 4, 2, 63, 63, 128, dict(window_size=16), None, id="L63-D128-window16"),
    pytest.param(
        1, 4, 1, 63, 111, 80, dict(causal=True, window_size=8), None, id="L63x111-D80-causal-window8"
    ),
    pytest.param(1, 4, 2, 63, 63, 64, dict(), "bool-emptyrow", id="L63-D64-boolmask-emptyrow"),
    pytest.param(1, 2, 1, 63, 111, 80, dict(), "add", id="L63x111-D80-addmask"),
    pytest.param(2, 4, 2, 111, 63, 64, dict(causal=True), "add-headbias", id="L111x63-D64-causal-headbias"),
]


def _case_mask(kind, b, hq, lq, lk):
    if kind is None:
        return None
    if kind == "bool-emptyrow":
        return _mask_bool(20, (b, 1, lq, lk), empty_row=5)
    if kind == "add":  # a learned fp32 position bias, also for fp16 / bf16 inputs
        return _mask_add(21, (b, hq, lq, lk))
    if kind == "add-headbias":  # per-head key bias broadcast over rows (ALiBi-like)
        return _mask_add(22, (1, hq, 1, lk))
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", list(TOL), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("b, hq, hkv, lq, lk, d, kw, mask_kind", CASES)
def test_matches_reference(dtype, b, hq, hkv, lq, lk, d, kw, mask_kind):
    q, r, k, v = _qrkv(30, b, hq, hkv, lq, lk, d, dtype)
    mask = _case_mask(mask_kind, b, hq, lq, lk)
    out = parallax_attention(q, r, k, v, attn_mask=mask, **kw)
    assert out.dtype == dtype and out.shape == (b, hq, lq, d)
    torch.manual_seed(31)
    grad_out = torch.randn(out.shape).to(dtype)
    out.backward(grad_out)

    q64, r64, k64, v64, mask64 = _upcast([q, r, k, v, mask])
    if mask is not None and mask.dtype == torch.bool:
        mask64 = mask
    ref = _ref(q64, r64, k64, v64, attn_mask=mask64, **kw)
    ref.backward(grad_out.to(F64))

    tol = TOL[dtype]
    errors = {"out": _rel(out, ref)}
    for name, x, x64 in zip("qrkv", (q, r, k, v), (q64, r64, k64, v64)):
        assert x.grad.dtype == dtype and x.grad.shape == x.shape
        errors["d" + name] = _rel(x.grad, x64.grad)
    if mask is not None and mask.requires_grad:
        assert mask.grad.dtype == mask.dtype and mask.grad.shape == mask.shape
        errors["dmask"] = _rel(mask.grad, mask64.grad)
    assert all(e <= tol for e in errors.values()), f"relative RMS errors {errors} exceed {tol}"

    # rows without any allowed key: output exactly 0, every gradient finite
    keep = allowed_keys(lq, lk, causal=kw.get("causal", False), window_size=kw.get("window_size"))
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    empty = ~keep.any(-1).expand(b, hq, lq)
    if mask_kind == "bool-emptyrow" or (kw.get("causal") and lq > lk):
        assert empty.any()
    assert torch.equal(out.detach()[empty], torch.zeros_like(out.detach()[empty]))
    for x in (q, r, k, v) + ((mask,) if mask is not None and mask.requires_grad else ()):
        assert x.grad.isfinite().all()


def test_statistics():
    """The three extra outputs: ``mu_v`` (softmax attention), ``lse`` (+inf on empty rows) and
    ``c = sum_j s_ij g_ij``, fp32 for fp16 inputs."""
    q, r, k, v = _qrkv(40, 1, 4, 2, 7, 5, 16, torch.float16, grad=False)
    out, mu_v, lse, c = OP(q, r, k, v, None, None, True, None)
    assert out.dtype == mu_v.dtype == torch.float16 and lse.dtype == c.dtype == torch.float32
    q64, r64, k64, v64 = _upcast([q, r, k, v])
    logits = attention_logits(q64, k64, causal=True)
    s = softmax_weights(logits)
    g = r64 @ k64.repeat_interleave(2, dim=1).mT
    empty = torch.zeros(7, dtype=torch.bool)
    empty[:2] = True
    assert torch.equal(lse[..., empty], torch.full_like(lse[..., empty], math.inf))
    torch.testing.assert_close(lse[..., ~empty].to(F64), logits.logsumexp(-1)[..., ~empty], rtol=0, atol=1e-5)
    torch.testing.assert_close(c.to(F64), (s * g).sum(-1), rtol=0, atol=1e-5)
    assert _rel(mu_v, softmax_attention_ref(q64, k64, v64, causal=True)) < TOL[torch.float16]


def test_float64_matches_effective_weights():
    """float64 in, float64 accumulation: agreement to rounding with ``o = A @ v``, Dv != D."""
    q, r, k, v = _qrkv(41, 2, 4, 2, 9, 13, 8, F64, dv=5, grad=False)
    mask = _mask_add(41, (2, 1, 9, 13), grad=False).to(F64)
    out = parallax_attention(q, r, k, v, causal=True, window_size=6, attn_mask=mask)
    a = effective_weights_ref(q, r, k, causal=True, window_size=6, attn_mask=mask)
    torch.testing.assert_close(out, a @ v.repeat_interleave(2, dim=1), rtol=0, atol=1e-12)


def test_noncontiguous_and_expanded_inputs():
    """``[B, L, H, D]`` tensors seen through ``transpose(1, 2)``, MQA keys/values and a padding mask
    made with ``expand`` (stride 0): the gradients land in the right places."""
    b, lq, h, d = 2, 9, 4, 8
    torch.manual_seed(45)
    q_blhd, r_blhd = (torch.randn(b, lq, h, d, dtype=F64, requires_grad=True) for _ in range(2))
    k1, v1 = (torch.randn(b, 1, lq, d, dtype=F64, requires_grad=True) for _ in range(2))
    bias = torch.randn(b, 1, 1, lq, dtype=F64, requires_grad=True)

    def run(fn):
        q, r = q_blhd.transpose(1, 2), r_blhd.transpose(1, 2)
        k, v = k1.expand(b, 2, lq, d), v1.expand(b, 2, lq, d)
        out = fn(q, r, k, v, causal=True, attn_mask=bias.expand(b, h, lq, lq))
        leaves = (q_blhd, r_blhd, k1, v1, bias)
        return out, torch.autograd.grad(out, leaves, torch.ones_like(out))

    out, grads = run(parallax_attention)
    ref, ref_grads = run(parallax_attention_ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b_ in zip(grads, ref_grads):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-11)


def test_empty_keys_give_zeros():
    q, r, _, _ = _qrkv(46, 1, 2, 2, 5, 0, 8, grad=False)
    k, v = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(expected, torch.zeros(1, 2, 5, 8))
    out = parallax_attention(q, r, k, v)
    assert torch.equal(out, expected)


# --- the query-chunk loop ------------------------------------------------------------------------


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 4], ids=lambda n: f"chunk{n}")
@pytest.mark.parametrize("mask_kind", ["rows", "rowbcast"])
def test_many_chunks(monkeypatch, rows_per_chunk, mask_kind):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 11, 13, 8
    q, r, k, v = _qrkv(50, b, hq, hkv, lq, lk, d, F64)
    shape = (b, hq, lq, lk) if mask_kind == "rows" else (1, hq, 1, lk)
    mask = _mask_add(51, shape).to(F64).detach().requires_grad_()
    kw = dict(causal=True, window_size=9, attn_mask=mask)

    calls = []
    logits_block = chunked._logits_block
    monkeypatch.setattr(chunked, "_logits_block", lambda *a, **k: calls.append(1) or logits_block(*a, **k))
    monkeypatch.setattr(chunked, "SCORE_BLOCK_BYTES", rows_per_chunk * 8 * b * hq * lk)  # fp64 blocks
    assert chunked._chunk_rows(b, hq, lk, F64) == rows_per_chunk

    out = parallax_attention(q, r, k, v, **kw)
    torch.manual_seed(52)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, r, k, v, mask), grad_out)
    n_chunks = -(-lq // rows_per_chunk)
    assert len(calls) == 2 * n_chunks  # forward + backward, one logits block per chunk

    q64, r64, k64, v64, m64 = _upcast([q, r, k, v, mask])
    ref = _ref(q64, r64, k64, v64, causal=True, window_size=9, attn_mask=m64)
    ref_grads = torch.autograd.grad(ref, (q64, r64, k64, v64, m64), grad_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for name, x, x64 in zip(("dq", "dr", "dk", "dv", "dmask"), grads, ref_grads):
        torch.testing.assert_close(x, x64, rtol=0, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_fp32_matches_single_chunk(monkeypatch):
    q, r, k, v = _qrkv(53, 1, 2, 1, 37, 29, 16)
    kw = dict(causal=True, attn_mask=_mask_add(54, (37, 29)))
    one = parallax_attention(q, r, k, v, **kw)
    g_one = torch.autograd.grad(one.sum(), (q, r, k, v, kw["attn_mask"]))
    monkeypatch.setattr(chunked, "SCORE_BLOCK_BYTES", 5 * 8 * 2 * 29)  # 5 fp64 rows: 8 chunks, last of 2
    many = parallax_attention(q, r, k, v, **kw)
    g_many = torch.autograd.grad(many.sum(), (q, r, k, v, kw["attn_mask"]))
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_many, g_one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- argument validation -------------------------------------------------------------------------


def _bad_cases():
    q, r, k, v = _qrkv(60, 1, 4, 2, 5, 6, 8, grad=False)
    yield "rank-q", (q[0], r[0], k, v), {}, ValueError, "`q`"
    yield "rank-k", (q, r, k[0, 0], v), {}, ValueError, "`k`"
    yield "head-dim", (q, r, k[..., :4], v), {}, ValueError, "`k`"
    yield "gqa-heads", (q, r, k[:, :1].expand(1, 3, 6, 8), v[:, :1].expand(1, 3, 6, 8)), {}, ValueError, "`q`"
    yield "r-shape", (q, r[:, :, :4], k, v), {}, ValueError, "`r`"
    yield "r-dtype", (q, r.half(), k, v), {}, TypeError, "`r`"
    yield "v-dtype", (q, r, k, v.double()), {}, TypeError, "`v`"
    yield "int-input", (q, r, k.long(), v), {}, TypeError, "`k`"
    yield "v-length", (q, r, k, v[:, :, :5]), {}, ValueError, "`v`"
    yield "batch", (q, r, torch.cat([k, k]), torch.cat([v, v])), {}, ValueError, "batch"
    yield "mask-shape", (q, r, k, v), dict(attn_mask=torch.zeros(1, 1, 5, 5)), ValueError, "`attn_mask`"
    yield "mask-rank", (q, r, k, v), dict(attn_mask=torch.zeros(1, 1, 1, 5, 6)), ValueError, "`attn_mask`"
    yield (
        "mask-int",
        (q, r, k, v),
        dict(attn_mask=torch.ones(5, 6, dtype=torch.int64)),
        TypeError,
        "`attn_mask`",
    )
    yield "window-0", (q, r, k, v), dict(window_size=0), ValueError, "`window_size`"
    yield "window-neg", (q, r, k, v), dict(window_size=-3), ValueError, "`window_size`"
    yield "scale-nan", (q, r, k, v), dict(scale=math.nan), ValueError, "`scale`"
    yield "device-k-meta", (q, r, k.to("meta"), v), {}, ValueError, "`k`"
    yield (
        "device-mask-meta",
        (q, r, k, v),
        dict(attn_mask=torch.zeros(5, 6, device="meta")),
        ValueError,
        "`attn_mask`",
    )


@pytest.mark.parametrize("args, kw, exc, name", [pytest.param(*c[1:], id=c[0]) for c in _bad_cases()])
def test_bad_input_raises_before_compute(monkeypatch, args, kw, exc, name):
    def boom(*a, **k):
        raise AssertionError("compute ran before the arguments were validated")

    monkeypatch.setattr(chunked, "parallax_fwd", boom)
    with pytest.raises(exc, match=name):
        parallax_attention(*args, **kw)


# --- agreement with scaled_dot_product_attention -------------------------------------------------


@pytest.mark.parametrize("nonzero_r", [False, True], ids=["r0", "r"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_q_propagates_like_sdpa(causal, nonzero_r):
    """Same NaN pattern as SDPA's math backend (the definition). SDPA's CPU flash backend returns 0
    for a NaN query row instead: a quirk of that kernel, not the semantics."""
    q, r, k, v = _qrkv(70, 1, 2, 2, 6, 6, 8, grad=False)
    q[0, 1, 2, 3] = math.nan
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = parallax_attention(q, r if nonzero_r else torch.zeros_like(r), k, v, causal=causal)
    assert expected.isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())
    # gradients do not crash either
    xs = [t.clone().requires_grad_() for t in (q, r, k, v)]
    parallax_attention(*xs, causal=causal).sum().backward()
    assert all(x.grad is not None for x in xs)


def _sdpa_cases():
    q, _, k, v = _qrkv(80, 2, 4, 4, 33, 33, 64)
    yield "causal", (q, k, v), dict(causal=True), dict(is_causal=True)
    q, _, k, v = _qrkv(81, 2, 4, 4, 17, 29, 64)
    m = _mask_bool(81, (2, 1, 17, 29))
    yield "boolmask", (q, k, v), dict(attn_mask=m), dict(attn_mask=m)
    m = _mask_add(82, (1, 4, 17, 29), grad=False)
    yield "addmask", (q, k, v), dict(attn_mask=m), dict(attn_mask=m)
    q, _, k, v = _qrkv(83, 1, 8, 2, 21, 21, 80)
    yield "gqa", (q, k, v), dict(), dict(enable_gqa=True)
    yield "gqa-scale", (q, k, v), dict(scale=0.05), dict(enable_gqa=True, scale=0.05)


@pytest.mark.parametrize("qkv, kw, sdpa_kw", [pytest.param(*c[1:], id=c[0]) for c in _sdpa_cases()])
def test_zero_probe_equals_sdpa(qkv, kw, sdpa_kw):
    q, k, v = qkv
    out = parallax_attention(q, torch.zeros_like(q), k, v, **kw)
    expected = F.scaled_dot_product_attention(q, k, v, **sdpa_kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # and the gradients w.r.t. q, k, v are SDPA's (dr is the extra one)
    torch.manual_seed(84)
    grad_out = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), grad_out)
    g_sdpa = torch.autograd.grad(expected, (q, k, v), grad_out)
    for a, b in zip(g, g_sdpa):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --- compile and export --------------------------------------------------------------------------


class _Block(torch.nn.Module):
    """A toy attention block: q, r, k, v projections (GQA), Parallax, output projection."""

    def __init__(self, dim=32, hq=4, hkv=2, causal=True):
        super().__init__()
        self.hq, self.hkv, self.hd, self.causal = hq, hkv, dim // hq, causal
        self.q = torch.nn.Linear(dim, dim)
        self.r = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * hkv * self.hd)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.hq, self.hd).transpose(1, 2)
        r = self.r(x).view(b, n, self.hq, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.hkv, self.hd).permute(2, 0, 3, 1, 4)
        y = parallax_attention(q, r, k, v, causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend):
    torch.manual_seed(90)
    block = _Block()
    x = torch.randn(2, 13, 32, requires_grad=True)
    expected = block(x)
    g_expected = torch.autograd.grad(expected.sum(), (x, block.r.weight))
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    out = compiled(x)
    g = torch.autograd.grad(out.sum(), (x, block.r.weight))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(g, g_expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="Inductor needs a C++ compiler"
)
def test_torch_compile_inductor_transposed_inputs():
    import torch._inductor.config

    torch.manual_seed(92)
    xs = [torch.randn(1, 5, 2, 8, requires_grad=True) for _ in range(4)]  # [B, L, H, D]

    def fn(q, r, k, v):
        return parallax_attention(*(t.transpose(1, 2) for t in (q, r, k, v)), causal=True)

    expected = fn(*xs)
    g_expected = torch.autograd.grad(expected.sum(), xs)
    # Inductor's on-disk caches do not key on the fake implementation: compile afresh, so a fixed
    # fake is seen (a stale cached backward would keep failing).
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        out = torch.compile(fn, fullgraph=True)(*xs)
        g = torch.autograd.grad(out.sum(), xs)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(g, g_expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_export_single_node():
    torch.manual_seed(91)
    block = _Block().eval()
    x = torch.randn(2, 13, 32)
    seq = torch.export.Dim("seq", min=2, max=512)
    ep = torch.export.export(block, (x,), dynamic_shapes=({1: seq},))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is OP]
    assert len(nodes) == 1
    assert nodes[0].args[6] is True or nodes[0].kwargs.get("causal") is True
    for n in (13, 40):
        x = torch.randn(2, n, 32)
        torch.testing.assert_close(ep.module()(x), block(x), rtol=1e-6, atol=1e-6)


def test_autocast_casts_inputs_like_sdpa():
    """Under torch.autocast, fp32 (or mixed fp32/bf16) q, r, k, v run in the autocast dtype, like
    SDPA; gradients reach the fp32 leaves and match the float64 reference within bf16 tolerance."""
    from parallax_compile.reference import parallax_attention_ref

    g = torch.Generator().manual_seed(3)
    q, r, k, v = (torch.randn(2, 4, 37, 16, generator=g) for _ in range(4))
    r = r * 0.25
    leaves = [t.clone().requires_grad_(True) for t in (q, r, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.parallax.attention(leaves[0], leaves[1].to(torch.bfloat16), leaves[2], leaves[3],
                                           None, None, True, None)[0]
    assert out.dtype == torch.bfloat16
    do = torch.randn(out.shape, generator=g)
    out.float().backward(do)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, r, k, v)]
    ref = parallax_attention_ref(*ref_leaves, causal=True)
    ref.backward(do.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, ref) < 2e-2
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == torch.float32
        assert rel(got.grad, want.grad) < 2e-2
    # outside autocast nothing is cast: mixed dtypes are an error naming the argument
    with pytest.raises(TypeError, match="`r` has dtype torch.bfloat16"):
        torch.ops.parallax.attention(q, r.to(torch.bfloat16), k, v, None, None, True, None)
