"""The fused Triton kernels (:mod:`parallax_compile.kernels.triton_parallax`) against the float64 oracle.

The launchers are called directly (not through ``torch.ops.parallax``): ``parallax_fwd`` then
``parallax_bwd`` with a random upstream gradient, and ``parallax_attention_varlen`` through
autograd. Output and all four gradients are compared with autograd through the float64
covariance form :func:`~parallax_compile.reference.parallax_attention_ref` using SPEC section 5's
relative-RMS tolerances (or no worse than 2x the same-dtype ``chunked`` implementation); the
statistics ``mu_v``, ``lse``, ``c`` against ``chunked`` in float64.

Two tiers:

* without a GPU: CPU tensors under ``TRITON_INTERPRET=1`` on small shapes (odd lengths, Lq != Lk
  causal both ways, windows, GQA/MQA, key-padding masks with a fully masked row, head_dim 64 / 80 /
  128, a value dim != head dim, fp16 / bf16 / fp32, varlen). The interpreter flag must be set
  before ``triton`` is first imported; when another test module (``torch._dynamo`` imports triton)
  got there first, the whole module re-runs itself in a subprocess (``test_interpreter_subprocess``).
* with a GPU (``torch.cuda.is_available()``): the same cases compiled on CUDA, plus the
  ``@pytest.mark.gpu`` class over a larger grid (L up to 4096, head_dim 64/128/256, all mask kinds).

Fresh allocations are poisoned with NaN (``triton_parallax.POISON`` and
``torch.utils.deterministic.fill_uninitialized_memory``), so an unwritten element cannot pass.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()


def _triton_ready() -> tuple[bool, str]:
    """Make ``triton`` importable in the mode this machine needs. Returns (in_process, reason)."""
    if CUDA:
        return True, ""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton`
        return True, ""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - broken install
        return False, "triton is importable but broken"
    if isinstance(tl.zeros, InterpretedFunction):
        return True, ""
    return False, "triton was imported before TRITON_INTERPRET=1 was set (torch._dynamo imports it)"


IN_PROCESS, _WHY_NOT = _triton_ready()
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.7.1)")

if IN_PROCESS:
    from parallax_compile.kernels import triton_parallax as tp

    if tp.INTERPRET != (not CUDA):  # imported earlier in the other mode
        tp = importlib.reload(tp)
else:
    tp = None

from parallax_compile.kernels import chunked
from parallax_compile.reference import allowed_keys, parallax_attention_ref

F64 = torch.float64
DEVICE = "cuda" if CUDA else "cpu"
# SPEC section 5: relative RMS error against float64, output and every gradient.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

needs_in_process = pytest.mark.skipif(not IN_PROCESS, reason=_WHY_NOT + "; see test_interpreter_subprocess")


@pytest.fixture(autouse=True)
def _poison_empty():
    """NaN in every fresh allocation of the launchers and of ``torch.empty``."""
    import torch.utils.deterministic as det

    was_fill, was_det = det.fill_uninitialized_memory, torch.are_deterministic_algorithms_enabled()
    was_poison = tp.POISON if tp is not None else None
    det.fill_uninitialized_memory = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    if tp is not None:
        tp.POISON = True
    yield
    det.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_det)
    if tp is not None:
        tp.POISON = was_poison


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    den = ref.norm().item()
    num = (x.double() - ref).norm().item()
    return num / den if den > 0 else num


def _inputs(seed, b, hq, hkv, lq, lk, d, dv, dtype, device=DEVICE):
    """Random ``q, r [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]``, ``dO``;
    ``r`` scaled by ``D**-0.5`` so that ``g = r.k`` is O(1) like the logits."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    r = torch.randn(b, hq, lq, d, generator=g) * d**-0.5
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, dv, generator=g)
    do = torch.randn(b, hq, lq, dv, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, r, k, v, do)]


def _make_mask(kind, b, hq, lk, device=DEVICE, seed=0):
    """Key-padding masks. Batch element 0 keeps a prefix, the last element is fully masked (bool)
    or partly -inf / finite (additive)."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "bool":  # [B, 1, 1, Lk], last batch element fully masked
        m = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        m[0, ..., (lk + 1) // 2:] = False
        m[-1] = False
    elif kind == "bool-head":  # [B, Hq, 1, Lk], random per head, one head fully masked
        m = torch.rand(b, hq, 1, lk, generator=g) > 0.3
        m[0, 0] = False
    elif kind == "additive":  # [B, 1, 1, Lk] with -inf and finite biases
        m = torch.randn(b, 1, 1, lk, generator=g)
        m[0, ..., ::3] = float("-inf")
    elif kind == "additive-1d":  # [Lk], finfo.min-style padding
        m = torch.zeros(lk)
        m[lk // 2:] = torch.finfo(torch.float32).min
    else:
        raise ValueError(kind)
    return m.to(device)


def _check(dtype, b, hq, hkv, lq, lk, d, dv=None, causal=False, window=None, mask_kind=None, seed=0,
           fwd_variant=None, bwd_variant=None):
    """Forward + backward through the launchers (kernel variants ``fwd_variant`` / ``bwd_variant``,
    default the dispatch table's) against float64 autograd; statistics against ``chunked`` in
    float64."""
    dv = d if dv is None else dv
    q, r, k, v, do = _inputs(seed, b, hq, hkv, lq, lk, d, dv, dtype)
    mask = _make_mask(mask_kind, b, hq, lk, seed=seed)
    if not (CUDA and dtype == torch.float32):  # fp32 on CUDA: supported by the launchers, routed to chunked
        assert tp.supports(q, r, k, v, mask, None, causal, window), tp.unsupported_reason(q, r, k, v, mask, None, causal, window)
    out, mu, lse, c = tp.parallax_fwd(q, r, k, v, mask, None, causal, window, variant=fwd_variant)
    dq, dr, dk, dv_, dmask = tp.parallax_bwd(do, q, r, k, v, out, mu, lse, c, mask, None, causal, window, False,
                                             variant=bwd_variant)
    assert dmask is None
    assert out.shape == (b, hq, lq, dv) and out.dtype == dtype and mu.dtype == dtype
    assert lse.shape == (b, hq, lq) and lse.dtype == torch.float32 and c.dtype == torch.float32
    assert dk.shape == k.shape and dv_.shape == v.shape and dq.shape == q.shape and dr.shape == r.shape
    for name, t in (("out", out), ("mu_v", mu), ("c", c), ("dq", dq), ("dr", dr), ("dk", dk), ("dv", dv_)):
        assert torch.isfinite(t).all(), f"{name} has non-finite values (unwritten or NaN)"

    leaves = [t.detach().to(F64).requires_grad_(True) for t in (q, r, k, v)]
    ref = parallax_attention_ref(*leaves, causal=causal, window_size=window, attn_mask=mask)
    ref.backward(do.to(F64))
    ref_stats = chunked.parallax_fwd(*(t.detach() for t in leaves), mask, d**-0.5, causal, window)

    tol = TOL[dtype]
    got = {"out": out, "dq": dq, "dr": dr, "dk": dk, "dv": dv_}
    want = {"out": ref.detach(), **{n: t.grad for n, t in zip(("dq", "dr", "dk", "dv"), leaves)}}
    # A gradient that is exactly zero in exact arithmetic (a row that sees a single key: dq, dr, dk
    # vanish) is compared in absolute terms against 4 ||dO||: SPEC section 3 rounds p*g to the input
    # dtype as a GEMM operand while c uses it in fp32, which leaves O(eps) noise there.
    do_norm = do.double().norm().item()
    errs = {
        n: _rel(got[n], want[n]) if want[n].norm().item() > 1e-6 * do_norm
        else (got[n].double() - want[n]).norm().item() / (4 * do_norm)
        for n in got
    }
    bad = {n: e for n, e in errs.items() if e > tol}
    if bad:  # SPEC section 5's alternative: no worse than 2x the same-dtype chunked implementation
        qc, rc, kc, vc = (t.detach().requires_grad_(True) for t in (q, r, k, v))
        co, cmu, clse, cc = chunked.parallax_fwd(qc, rc, kc, vc, mask, d**-0.5, causal, window)
        cg = chunked.parallax_bwd(do, qc, rc, kc, vc, co, cmu, clse, cc, mask, d**-0.5, causal, window, False)
        chunk_err = {"out": _rel(co, want["out"]), **{n: _rel(t, want[n]) for n, t in zip(("dq", "dr", "dk", "dv"), cg)}}
        bad = {n: (e, chunk_err[n]) for n, e in bad.items() if e > 2 * chunk_err[n]}
    assert not bad, f"relative RMS errors over {tol} (and over 2x chunked): {bad}; all: {errs}"

    _, r_mu, r_lse, r_c = ref_stats
    assert _rel(mu, r_mu) <= tol, f"mu_v error {_rel(mu, r_mu)}"
    empty = torch.isinf(r_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] > 0).all(), "lse = +inf exactly on empty rows"
    # rows that see only finfo.min-masked keys: uniform weights; chunked's lse is finfo.min + log n,
    # the kernels' MASK_FLOOR ln 2 + log n (n = keys the row sees), which keeps log n in fp32
    huge = r_lse < -1e30
    if huge.any():  # n = keys the row sees (all of them finfo.min-masked there)
        seen = allowed_keys(lq, lk, causal=causal, window_size=window).expand(b, hq, lq, lk)
        if mask is not None and mask.dtype != torch.bool:
            seen = seen & (mask.cpu().expand(b, hq, 1, lk) > -math.inf)
        n = seen.sum(-1).double().to(lse.device)
        want_lse = float(tp.MASK_FLOOR.value) * math.log(2) + torch.log(n)
        assert torch.allclose(lse[huge].double(), want_lse[huge], atol=2e-3), "lse of rows seeing only finfo.min keys"
    normal = ~empty & ~huge
    assert torch.allclose(lse[normal].double(), r_lse[normal], atol=1e-3, rtol=1e-4)
    assert torch.allclose(c.double(), r_c, atol=2e-3, rtol=1e-2)
    if empty.any():  # rows with no allowed key: exactly 0 output and 0 gradients
        assert (out[empty] == 0).all() and (dq[empty] == 0).all() and (dr[empty] == 0).all()
    return errs


# (id, B, Hq, Hkv, Lq, Lk, D, Dv, causal, window, mask)
CASES = [
    ("L1", 1, 2, 2, 1, 1, 64, 64, False, None, None),
    ("L1-causal", 1, 2, 1, 1, 1, 64, 64, True, None, None),
    ("L17", 1, 2, 2, 17, 17, 64, 64, False, None, None),
    ("L63-causal", 1, 2, 2, 63, 63, 64, 64, True, None, None),
    ("q17-k63-causal", 1, 2, 2, 17, 63, 64, 64, True, None, None),
    ("q63-k17-causal", 1, 2, 2, 63, 17, 64, 64, True, None, None),
    ("q17-k63", 1, 2, 2, 17, 63, 64, 64, False, None, None),
    ("window8-causal", 1, 2, 2, 63, 63, 64, 64, True, 8, None),
    ("window8", 1, 2, 2, 50, 50, 64, 64, False, 8, None),
    ("gqa4:2-causal", 1, 4, 2, 33, 33, 64, 64, True, None, None),
    ("mqa4:1-window", 1, 4, 1, 40, 40, 64, 64, True, 16, None),
    ("pad-bool", 2, 2, 1, 33, 33, 64, 64, False, None, "bool"),
    ("pad-bool-head-causal", 2, 2, 2, 33, 33, 64, 64, True, None, "bool-head"),
    ("pad-additive", 2, 2, 2, 17, 40, 64, 64, False, None, "additive"),
    ("pad-additive-1d", 1, 2, 2, 33, 33, 64, 64, True, None, "additive-1d"),
    # rows 22.. see only finfo.min-padded keys (window 6, keys >= 17 padded): uniform weights
    ("window-pad-additive-1d", 1, 2, 2, 34, 34, 64, 64, False, 6, "additive-1d"),
    ("d80-causal", 1, 2, 2, 40, 40, 80, 80, True, None, None),
    ("d128", 1, 2, 1, 33, 33, 128, 128, False, None, None),
    ("d64-dv80", 1, 2, 2, 33, 33, 64, 80, True, None, None),
]
FP32_CASES = {"L17", "q63-k17-causal", "window8", "pad-bool"}


def _params():
    out = []
    for case in CASES:
        for dtype in (torch.float16, torch.bfloat16):
            out.append(pytest.param(dtype, *case[1:], id=f"{case[0]}-{DTYPE_IDS[dtype]}"))
        if case[0] in FP32_CASES:
            out.append(pytest.param(torch.float32, *case[1:], id=f"{case[0]}-fp32"))
    return out


@needs_in_process
@pytest.mark.parametrize("dtype,b,hq,hkv,lq,lk,d,dv,causal,window,mask_kind", _params())
def test_parallax_fwd_bwd(dtype, b, hq, hkv, lq, lk, d, dv, causal, window, mask_kind):
    _check(dtype, b, hq, hkv, lq, lk, d, dv, causal, window, mask_kind)


def _varlen_check(dtype, lens_q, lens_k, hq, hkv, d, causal, window, device=DEVICE, seed=0, dv=None):
    """``parallax_attention_varlen`` forward + autograd backward against the reference applied to
    each sequence separately (a sequence with no keys must give 0)."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    dv = d if dv is None else dv
    q = torch.randn(tq, hq, d, generator=g)
    r = torch.randn(tq, hq, d, generator=g) * d**-0.5
    k = torch.randn(tk, hkv, d, generator=g)
    v = torch.randn(tk, hkv, dv, generator=g)
    do = torch.randn(tq, hq, dv, generator=g)
    q, r, k, v, do = (t.to(device=device, dtype=dtype) for t in (q, r, k, v, do))
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)

    xs = [t.detach().requires_grad_(True) for t in (q, r, k, v)]
    out = tp.parallax_attention_varlen(*xs, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window_size=window)
    out.backward(do)
    assert out.shape == (tq, hq, dv) and torch.isfinite(out).all()

    leaves = [t.detach().to(F64).requires_grad_(True) for t in (q, r, k, v)]
    outs = []
    for i in range(len(lens_q)):
        sq, sk = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        qi, ri = (t[sq].transpose(0, 1)[None] for t in leaves[:2])
        ki, vi = (t[sk].transpose(0, 1)[None] for t in leaves[2:])
        if lens_k[i] == 0:
            outs.append(qi.new_zeros(lens_q[i], hq, dv) + 0 * qi.sum())
            continue
        oi = parallax_attention_ref(qi, ri, ki, vi, causal=causal, window_size=window)
        outs.append(oi[0].transpose(0, 1))
    ref = torch.cat(outs)
    ref.backward(do.to(F64))
    tol = TOL[dtype]
    errs = {"out": _rel(out, ref.detach())}
    errs.update({n: _rel(x.grad, y.grad) for n, x, y in zip(("dq", "dr", "dk", "dv"), xs, leaves)})
    assert all(torch.isfinite(x.grad).all() for x in xs)
    assert all(e <= tol for e in errs.values()), errs
    return errs


VARLEN_CASES = [
    pytest.param((5, 17, 30), (5, 17, 30), 2, 2, True, None, id="ragged-causal"),
    pytest.param((9, 1, 24), (20, 33, 11), 4, 2, True, None, id="ragged-qk-gqa-causal"),
    pytest.param((7, 19, 26), (7, 19, 26), 2, 1, False, 6, id="ragged-window-mqa"),
    pytest.param((6, 12, 3), (10, 0, 16), 2, 2, False, None, id="ragged-empty-seq"),
]


@needs_in_process
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("lens_q,lens_k,hq,hkv,causal,window", VARLEN_CASES)
def test_parallax_attention_varlen(dtype, lens_q, lens_k, hq, hkv, causal, window):
    _varlen_check(dtype, list(lens_q), list(lens_k), hq, hkv, 64, causal, window)


# Kernel variants (performance only; each must give the same function). One case per variant in
# rotation, plus a value dim > 128 (the split-dv variants split it in blocks of 128).
_VARIANT_SHAPES = [
    # (id, B, Hq, Hkv, Lq, Lk, D, Dv, causal, window, mask)
    ("gqa4:2-causal", 1, 4, 2, 33, 33, 64, 64, True, None, None),
    ("q17-k40-additive", 2, 2, 2, 17, 40, 64, 64, False, None, "additive"),
    ("q40-k17-causal-window", 1, 2, 1, 40, 17, 64, 80, True, 8, None),
    ("d80-bool-head-causal", 2, 2, 2, 33, 33, 80, 80, True, None, "bool-head"),
]
_DV160 = ("d32-dv160-causal", 1, 2, 1, 20, 20, 32, 160, True, None, None)


def _variant_params():
    out = []
    names = sorted(tp.FWD_VARIANTS) if tp is not None else []
    for i, name in enumerate(names):
        case = _DV160 if "split" in name else _VARIANT_SHAPES[i % len(_VARIANT_SHAPES)]
        out.append(pytest.param(name, "base", case, id=f"fwd-{name}-{case[0]}"))
    for i, name in enumerate(sorted(tp.BWD_VARIANTS) if tp is not None else []):
        for case in (_VARIANT_SHAPES[i % len(_VARIANT_SHAPES)], _VARIANT_SHAPES[(i + 1) % len(_VARIANT_SHAPES)]):
            out.append(pytest.param("base", name, case, id=f"bwd-{name}-{case[0]}"))
    return out


@needs_in_process
@pytest.mark.parametrize("fwd_variant,bwd_variant,case", _variant_params())
def test_variants(fwd_variant, bwd_variant, case):
    """Every forward and backward kernel variant against the float64 oracle (output, statistics and
    all four gradients)."""
    _check(torch.bfloat16, *case[1:], fwd_variant=fwd_variant, bwd_variant=bwd_variant)


@needs_in_process
def test_variants_varlen_through_dispatch(monkeypatch):
    """The DISPATCH table picks the variants used by the varlen entry point: persistent forward with
    TMA loads (a sequence shorter than its grid's query blocks, one with no keys) and the atomic-dQ
    backward."""
    monkeypatch.setattr(tp, "DISPATCH", {b: ("tma-persistent", "atomic-dq") for b in tp.DISPATCH})
    assert tp.resolve_variant(None, "fwd", 64, 64, 30) == tp.FWD_VARIANTS["tma-persistent"]
    assert tp.resolve_variant(None, "bwd", 64, 64, 30) == tp.BWD_VARIANTS["atomic-dq"]
    _varlen_check(torch.float16, [9, 1, 24], [20, 0, 11], 4, 2, 64, True, None)


@needs_in_process
def test_variant_names():
    assert tp.shape_bucket(128, 128, 1024) == "d128-short" and tp.shape_bucket(64, 256, 4096) == "d256-long"
    assert tp.resolve_variant("tma", "fwd", 128, 128, 4096).tma
    with pytest.raises(ValueError, match="variant"):
        tp.resolve_variant("atomic-dq", "fwd", 128, 128, 4096)
    # TMA needs 16-byte rows; otherwise the launch keeps pointer loads (same results)
    odd = torch.zeros(1, 1, 4, 7, dtype=torch.float16, device=DEVICE)
    assert not tp._tma_ready(odd)
    assert tp._tma_ready(torch.zeros(1, 1, 4, 8, dtype=torch.float16, device=DEVICE))


@needs_in_process
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_finfo_min_left_padding(dtype):
    """HF-style additive left padding (``finfo.min``) with causal: the first rows see only padding
    keys. Forward: those rows get uniform weights like the reference (no overflow to -inf, no 0).
    Backward with ``dO = 0`` on those rows (padding positions carry no loss): finite and accurate."""
    b, h, l, d, pad = 2, 2, 33, 64, 7
    q, r, k, v, do = _inputs(5, b, h, h, l, l, d, d, dtype)
    mask = torch.zeros(b, 1, 1, l, device=DEVICE)
    mask[0, ..., :pad] = torch.finfo(torch.float32).min
    do[0, :, :pad] = 0
    out, mu, lse, c = tp.parallax_fwd(q, r, k, v, mask, None, True, None)
    leaves = [t.detach().to(F64).requires_grad_(True) for t in (q, r, k, v)]
    ref = parallax_attention_ref(*leaves, causal=True, attn_mask=mask)
    assert _rel(out, ref.detach()) <= TOL[dtype]
    ref.backward(do.to(F64))
    grads = tp.parallax_bwd(do, q, r, k, v, out, mu, lse, c, mask, None, True, None, False)[:4]
    for g, leaf in zip(grads, leaves):
        assert torch.isfinite(g).all()
        assert _rel(g, leaf.grad) <= TOL[dtype]


@needs_in_process
def test_supports():
    q, r, k, v, _ = _inputs(0, 2, 4, 2, 8, 8, 64, 64, torch.float16)
    assert tp.supports(q, r, k, v)
    assert tp.supports(q, r, k, v, torch.ones(2, 1, 1, 8, dtype=torch.bool, device=DEVICE))
    assert tp.supports(q, r, k, v, torch.zeros(2, 4, 1, 8, device=DEVICE))
    assert tp.supports(q, r, k, v, torch.zeros(8, device=DEVICE))
    # general masks, learned masks: fall back to chunked
    assert not tp.supports(q, r, k, v, torch.ones(8, 8, dtype=torch.bool, device=DEVICE))
    assert not tp.supports(q, r, k, v, torch.zeros(2, 4, 8, 8, device=DEVICE))
    assert not tp.supports(q, r, k, v, torch.zeros(2, 1, 1, 8, device=DEVICE), mask_needs_grad=True)
    assert not tp.supports(q, r, k, v, torch.zeros(2, 1, 1, 8, device=DEVICE, requires_grad=True))
    assert "mask shape" in tp.unsupported_reason(q, r, k, v, torch.zeros(1, 1, 8, 8, device=DEVICE))
    # dtypes, head dims, devices
    assert not tp.supports(*(t.double() for t in (q, r, k, v)))
    assert tp.supports(*(t.float() for t in (q, r, k, v))) == (not CUDA or tp.GPU_FP32)
    big = torch.zeros(1, 1, 4, 320, dtype=torch.float16, device=DEVICE)
    assert not tp.supports(big, big, big, big)
    other = "meta"
    assert not tp.supports(*(t.to(other) for t in (q, r, k, v)))
    with pytest.raises(NotImplementedError):
        tp.parallax_bwd(q, q, r, k, v, q, q, q[..., 0].float(), q[..., 0].float(), None, None, False, None, True)


@pytest.mark.skipif(IN_PROCESS or CUDA, reason="runs only when triton was imported before the interpreter flag")
def test_interpreter_subprocess():
    """Re-run this module in a fresh interpreter with ``TRITON_INTERPRET=1`` set before triton loads."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        check=False, cwd=root, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# GPU tier (run on the H200): larger shapes, all mask kinds, head_dim up to 256
# ---------------------------------------------------------------------------------------------

GPU_CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, causal, window, mask)
    (2, 4, 4, 128, 128, 64, True, None, None),
    (1, 4, 2, 1000, 1000, 128, True, None, None),
    (1, 4, 2, 1000, 1000, 128, False, None, "bool"),
    (2, 2, 2, 777, 1531, 128, True, None, "additive"),
    (1, 2, 2, 1531, 777, 128, True, None, None),
    (1, 2, 1, 4096, 4096, 128, True, None, None),
    (1, 2, 2, 4096, 4096, 64, False, None, "bool-head"),
    (1, 4, 1, 2048, 2048, 128, True, 256, None),
    (1, 2, 2, 2048, 2048, 64, False, 300, "additive-1d"),
    (1, 2, 2, 1024, 1024, 256, True, None, None),
    (1, 2, 1, 999, 999, 256, False, None, "bool"),
    (1, 2, 2, 1000, 1000, 96, True, None, None),
    (1, 2, 2, 1000, 1000, 80, False, None, None),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
class TestGPU:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    @pytest.mark.parametrize(
        "b,hq,hkv,lq,lk,d,causal,window,mask_kind", GPU_CASES,
        ids=[f"b{c[0]}h{c[1]}:{c[2]}-q{c[3]}k{c[4]}-d{c[5]}-{'causal' if c[6] else 'full'}-w{c[7]}-{c[8]}" for c in GPU_CASES],
    )
    def test_parallax_fwd_bwd(self, dtype, b, hq, hkv, lq, lk, d, causal, window, mask_kind):
        _check(dtype, b, hq, hkv, lq, lk, d, d, causal, window, mask_kind)

    @pytest.mark.parametrize("lq,causal", [(512, True), (1000, False)])
    def test_fp32(self, lq, causal):
        _check(torch.float32, 1, 2, 1, lq, lq, 128, 128, causal, None, None)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    def test_varlen(self, dtype):
        _varlen_check(dtype, [300, 1, 1200, 77], [300, 64, 1500, 77], 8, 2, 128, True, None)
        _varlen_check(dtype, [513, 1024, 7], [513, 1024, 7], 4, 4, 64, False, 128)

    @pytest.mark.parametrize("fwd_variant", sorted(tp.FWD_VARIANTS) if tp is not None else [])
    def test_fwd_variants(self, fwd_variant):
        """Each forward variant on odd lengths with Lq != Lk, GQA and an additive mask, and at
        head_dim 256 with a window (the split-dv variants split its value columns)."""
        _check(torch.bfloat16, 2, 4, 2, 777, 1531, 128, 128, True, None, "additive", fwd_variant=fwd_variant)
        _check(torch.bfloat16, 1, 4, 1, 1000, 1000, 256, 256, False, 300, None, fwd_variant=fwd_variant)

    @pytest.mark.parametrize("bwd_variant", sorted(tp.BWD_VARIANTS) if tp is not None else [])
    def test_bwd_variants(self, bwd_variant):
        _check(torch.bfloat16, 2, 4, 2, 777, 1531, 128, 128, True, None, "additive", bwd_variant=bwd_variant)
        _check(torch.bfloat16, 1, 4, 1, 1000, 1000, 64, 64, False, 300, "bool-head", bwd_variant=bwd_variant)

    def test_non_contiguous_layout(self):
        """``[B, L, H, D]`` storage viewed as ``[B, H, L, D]`` (what a projection + transpose gives)."""
        q, r, k, v, _ = _inputs(3, 2, 4, 2, 300, 300, 128, 128, torch.bfloat16)
        qt, rt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, r, k, v))
        a = tp.parallax_fwd(q, r, k, v, None, None, True, None)
        b = tp.parallax_fwd(qt, rt, kt, vt, None, None, True, None)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
