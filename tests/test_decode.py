"""Decode with a KV cache: :func:`parallax_compile.parallax_attention_with_kvcache` and the split-KV
Triton kernel (:mod:`parallax_compile.kernels.triton_decode`) against the float64 oracle.

The oracle is :func:`~parallax_compile.reference.parallax_attention_ref` run per sequence on that
sequence's own cache prefix ``k[b, :, :cache_seqlens[b]]`` with ``causal=True`` (end-aligned) and
the window: the query tokens are the last ``Lq`` tokens of each sequence. Paged caches are built by
scattering a contiguous cache into randomly permuted blocks, so the oracle never sees the pages.

Tiers: the Triton kernel on CPU tensors under ``TRITON_INTERPRET=1`` (small shapes: ragged lengths,
windows, GQA/MQA, paged blocks of odd size, split counts that do not divide the length, a row with
no key), the portable path (the public entry point on the CPU), argument errors; with a GPU the
``gpu`` class over a larger grid.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import parallax_compile
from parallax_compile import parallax_attention_with_kvcache
from parallax_compile.reference import parallax_attention_ref, softmax_attention_ref

CUDA = torch.cuda.is_available()


def _triton_ready() -> tuple[bool, str]:
    if CUDA:
        return True, ""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton`
        return True, ""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False, "triton is importable but broken"
    if isinstance(tl.zeros, InterpretedFunction):
        return True, ""
    return False, "triton was imported before TRITON_INTERPRET=1 was set (torch._dynamo imports it)"


IN_PROCESS, _WHY_NOT = _triton_ready()
try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

td = None
if HAVE_TRITON and IN_PROCESS:
    from parallax_compile.kernels import triton_decode as td

    if td.INTERPRET != (not CUDA):
        td = importlib.reload(td)

DEVICE = "cuda" if CUDA else "cpu"
F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}
needs_kernel = pytest.mark.skipif(td is None, reason=_WHY_NOT or "triton is not installed")


@pytest.fixture(autouse=True)
def _poison():
    if td is not None:
        was, td.POISON = td.POISON, True
        yield
        td.POISON = was
    else:
        yield


def _rel(x, ref):
    ref = ref.double()
    den = ref.norm().item()
    num = (x.double() - ref).norm().item()
    return num / den if den > 0 else num


def make_case(seed, b, hq, hkv, lq, d, seqlens, l_max, dv=None, block_size=None, dtype=torch.float32,
              device=DEVICE):
    """Random ``q, r [B, Hq, Lq, D]``, a contiguous cache ``k, v [B, Hkv, L_max, D]``, int32
    ``cache_seqlens`` and, with ``block_size``, the same cache scattered into permuted blocks
    ``[num_blocks, Hkv, block_size, D]`` with its ``block_table``. ``r`` is scaled by ``D**-0.5``."""
    dv = dv or d
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    r = torch.randn(b, hq, lq, d, generator=g) * d**-0.5
    k = torch.randn(b, hkv, l_max, d, generator=g)
    v = torch.randn(b, hkv, l_max, dv, generator=g)
    out = {"q": q, "r": r, "k": k, "v": v, "cache_seqlens": torch.tensor(seqlens, dtype=torch.int32)}
    if block_size is not None:
        assert l_max % block_size == 0
        nb = l_max // block_size
        total = b * nb + 3  # a few blocks nobody uses
        perm = torch.randperm(total, generator=g)[: b * nb].reshape(b, nb)
        kp = torch.randn(total, hkv, block_size, d, generator=g)
        vp = torch.randn(total, hkv, block_size, dv, generator=g)
        for i in range(b):
            for j in range(nb):
                kp[perm[i, j]] = k[i, :, j * block_size:(j + 1) * block_size]
                vp[perm[i, j]] = v[i, :, j * block_size:(j + 1) * block_size]
        out.update(k_pages=kp, v_pages=vp, block_table=perm.to(torch.int32))
    return {n: (t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)) for n, t in out.items()}


def oracle(c, window_size=None, scale=None):
    """float64 per-sequence reference on each sequence's cache prefix."""
    outs = []
    for i, n in enumerate(c["cache_seqlens"].tolist()):
        if n == 0:  # an empty cache: no row sees a key, the output is 0 (the reference needs Lk >= 1)
            outs.append(torch.zeros(1, *c["q"].shape[1:3], c["v"].shape[-1], dtype=F64, device=c["q"].device))
            continue
        args = (c["q"][i:i + 1], c["r"][i:i + 1], c["k"][i:i + 1, :, :n], c["v"][i:i + 1, :, :n])
        outs.append(parallax_attention_ref(*(t.to(F64) for t in args), causal=True, window_size=window_size,
                                           scale=scale))
    return torch.cat(outs)


def _call(fn, c, paged, **kw):
    if paged:
        return fn(c["q"], c["r"], c["k_pages"], c["v_pages"], cache_seqlens=c["cache_seqlens"],
                  block_table=c["block_table"], **kw)
    return fn(c["q"], c["r"], c["k"], c["v"], cache_seqlens=c["cache_seqlens"], **kw)


def _kernel(q, r, k, v, *, cache_seqlens, block_table=None, window_size=None, num_splits=None, scale=None,
            variant=None):
    s = q.shape[-1] ** -0.5 if scale is None else scale
    return td.parallax_decode(q, r, k, v, cache_seqlens, block_table, s, window_size, num_splits=num_splits,
                              variant=variant)


# (B, Hq, Hkv, Lq, D, seqlens, L_max, window, block_size, num_splits, dtype)
KERNEL_CASES = [
    pytest.param(3, 4, 2, 1, 32, [37, 5, 64], 64, None, None, 3, torch.float32, id="ragged-gqa-split3-fp32"),
    pytest.param(2, 4, 1, 1, 40, [50, 19], 51, 7, None, 4, torch.float32, id="mqa-window-odd-d-split4"),
    pytest.param(2, 2, 2, 3, 32, [33, 3], 40, None, 8, 5, torch.float32, id="paged-bs8-lq3-split5"),
    pytest.param(2, 6, 2, 2, 16, [45, 30], 45, 10, 5, 2, torch.float32, id="paged-bs5-window-lq2"),
    pytest.param(2, 4, 2, 1, 64, [61, 17], 64, None, 16, None, torch.bfloat16, id="paged-bf16-auto"),
    pytest.param(2, 2, 1, 2, 32, [1, 29], 32, None, None, 1, torch.float16, id="fp16-row-without-keys"),
    # 15 requested -> chunks of 32 keys -> 10 splits (> the merge's 8-split chunk), last one partial
    pytest.param(2, 2, 1, 1, 32, [300, 77], 300, None, None, 15, torch.float32, id="ten-splits-ragged"),
]


@needs_kernel
@pytest.mark.parametrize("b,hq,hkv,lq,d,seqlens,l_max,window,bs,splits,dtype", KERNEL_CASES)
def test_triton_decode_kernel_matches_oracle(b, hq, hkv, lq, d, seqlens, l_max, window, bs, splits, dtype):
    c = make_case(1, b, hq, hkv, lq, d, seqlens, l_max, block_size=bs, dtype=dtype)
    out = _call(_kernel, c, bs is not None, window_size=window, num_splits=splits)
    assert out.shape == (b, hq, lq, d) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert _rel(out, oracle(c, window)) <= TOL[dtype]


# (B, Hq, Hkv, Lq, D, seqlens, L_max, window, block_size, num_splits, dtype): G * Lq == 1 (the
# "vector" mode runs) and G * Lq > 1 ("vector" falls back to the stacked tile); lengths 0 and full
VARIANT_CASES = [
    pytest.param(3, 2, 2, 1, 40, [0, 37, 48], 48, 9, 8, 3, torch.float32, id="mha-paged-window-len0-full"),
    pytest.param(2, 3, 3, 1, 64, [64, 21], 64, None, None, None, torch.bfloat16, id="mha-bf16-auto-splits"),
    pytest.param(2, 2, 2, 1, 32, [300, 77], 300, None, None, 15, torch.float32, id="mha-ten-splits"),
    pytest.param(2, 4, 2, 2, 32, [33, 2], 40, 6, 5, 4, torch.float32, id="gqa-paged-bs5-lq2-window"),
    pytest.param(2, 4, 1, 1, 48, [50, 17], 50, 11, None, 2, torch.float16, id="mqa-fp16-window"),
]
VARIANTS = {
    "stack-16x4x1": {"tile": (16, 4, 1)},
    "unstack-32x4x2-wide": {"mode": "unstack", "tile": (32, 4, 2), "merge": "wide"},
    "vector-16x4x1": {"mode": "vector", "tile": (16, 4, 1)},
    "vector-auto-wide": {"mode": "vector", "merge": "wide"},
    "stack-pps0.5": {"programs_per_sm": 0.5},
}


@needs_kernel
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("b,hq,hkv,lq,d,seqlens,l_max,window,bs,splits,dtype", VARIANT_CASES)
def test_triton_decode_variants_match_oracle(variant, b, hq, hkv, lq, d, seqlens, l_max, window, bs, splits,
                                             dtype):
    """Every :class:`DecodeVariant` (mode, explicit tile, split rule, merge) against the oracle."""
    c = make_case(2, b, hq, hkv, lq, d, seqlens, l_max, block_size=bs, dtype=dtype)
    out = _call(_kernel, c, bs is not None, window_size=window, num_splits=splits,
                variant=td.DecodeVariant(**VARIANTS[variant]))
    assert out.shape == (b, hq, lq, d) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert _rel(out, oracle(c, window)) <= TOL[dtype]
    if 0 in seqlens:
        assert (out[seqlens.index(0)] == 0).all()  # no key: 0


@needs_kernel
def test_triton_decode_variant_rules():
    """Dispatch classes of the sweep's shapes, the table's default, bad variants, the tile fallback."""
    assert td.shape_class(32, 8, 8, 1, 128, 128, 16384, 132) == ("one", 128, "wide", "short")
    assert td.shape_class(1, 32, 8, 1, 128, 128, 32768, 132) == ("group", 128, "narrow", "short")
    assert td.shape_class(8, 4, 1, 1, 256, 256, 32768, 132) == ("group", 256, "narrow", "short")
    assert td.shape_class(1, 8, 8, 1, 128, 128, 131072, 132) == ("one", 128, "narrow", "long")
    assert td.shape_class(4, 8, 8, 2, 64, 64, 100, 132) == ("group", 128, "narrow", "short")  # Lq 2: a group
    sentinel = td.DecodeVariant(mode="unstack", programs_per_sm=2)
    listed = td.shape_class(2, 4, 4, 3, 96, 96, 999, 132)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(td, "_DISPATCH", {listed: sentinel})
        assert td.pick_variant(2, 4, 4, 3, 96, 96, 999, 132) == sentinel  # the table's entry
        assert td.pick_variant(8, 4, 1, 1, 256, 256, 32768, 132) == td.DecodeVariant()  # class not in it
    n, chunk = td.split_plan(1, 8, 16384, 132, td.DecodeVariant())
    assert chunk % td.SPLIT_GRANULE == 0 and (n - 1) * chunk < 16384 <= n * chunk  # tile L_max, none empty
    assert n <= td.pick_num_splits(1, 8, 16384, 132) and td.split_plan(1, 8, 16384, 132, td.DecodeVariant(
        programs_per_sm=0.5))[0] < n
    assert td.split_plan(1, 8, 16384, 132, td.DecodeVariant(num_splits=5), num_splits=3)[0] == 3  # caller's
    for bad in ({"mode": "gemv"}, {"merge": "atomic"}, {"tile": (48, 4, 2)}, {"tile": (64, 4)},
                {"programs_per_sm": 0}, {"num_splits": 0}):
        with pytest.raises(ValueError, match="DecodeVariant"):
            td.DecodeVariant(**bad)
    assert not td.tile_fits((128, 4, 4), 256, 256, 4)  # fp32 D=256: the launch autotunes instead
    c = make_case(3, 1, 2, 2, 1, 256, [20], 20)
    out = _kernel(c["q"], c["r"], c["k"], c["v"], cache_seqlens=c["cache_seqlens"], num_splits=2,
                  variant=td.DecodeVariant(mode="vector", tile=(128, 4, 4)))
    assert _rel(out, oracle(c)) <= 1e-5


@needs_kernel
def test_triton_decode_splits_agree_and_r_zero_is_softmax():
    """Every split count gives the same output (the merge is exact), and ``r = 0`` is softmax."""
    c = make_case(2, 2, 4, 2, 1, 32, [70, 23], 70)
    c["r"] = torch.zeros_like(c["r"])
    outs = [_kernel(c["q"], c["r"], c["k"], c["v"], cache_seqlens=c["cache_seqlens"], num_splits=s) for s in (1, 2, 5)]
    for o in outs[1:]:
        assert _rel(o, outs[0]) <= 1e-6
    for i, n in enumerate(c["cache_seqlens"].tolist()):
        ref = softmax_attention_ref(c["q"][i:i + 1].double(), c["k"][i:i + 1, :, :n].double(),
                                    c["v"][i:i + 1, :, :n].double(), causal=True)
        assert _rel(outs[2][i:i + 1], ref) <= 1e-5


# ------------------------------------------------------------------ public entry point (CPU path)

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("window", [None, 6])
def test_with_kvcache_matches_oracle(dtype, paged, window):
    c = make_case(3, 3, 6, 2, 2, 24, [30, 2, 17], 30, block_size=5 if paged else None, dtype=dtype)
    out = _call(parallax_attention_with_kvcache, c, paged, window_size=window, scale=0.3)
    assert out.shape == (3, 6, 2, 24) and out.dtype == dtype
    assert _rel(out, oracle(c, window, scale=0.3)) <= TOL[dtype]


def test_with_kvcache_flash_attn_page_layout():
    """A FlashAttention-layout paged cache ``[num_blocks, block_size, Hkv, D]`` passed as its
    ``transpose(1, 2)`` view (no copy) gives the same result."""
    c = make_case(4, 2, 4, 2, 1, 16, [19, 8], 20, block_size=4)
    fa_k = c["k_pages"].transpose(1, 2).contiguous()  # [num_blocks, block_size, Hkv, D]
    fa_v = c["v_pages"].transpose(1, 2).contiguous()
    out = parallax_attention_with_kvcache(c["q"], c["r"], fa_k.transpose(1, 2), fa_v.transpose(1, 2),
                                          cache_seqlens=c["cache_seqlens"], block_table=c["block_table"])
    assert _rel(out, oracle(c)) <= 1e-5


def test_with_kvcache_is_exported_and_documented():
    assert parallax_compile.parallax_attention_with_kvcache is parallax_attention_with_kvcache
    doc = parallax_attention_with_kvcache.__doc__
    assert "[B, Hq, Lq, D]" in doc and "block_table" in doc and "Raises" in doc


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda c: c.update(cache_seqlens=c["cache_seqlens"].long()), "cache_seqlens.*int32"),
        (lambda c: c.update(cache_seqlens=torch.tensor([3], dtype=torch.int32, device=c["q"].device)), r"cache_seqlens.*\[B\]"),
        (lambda c: c.update(cache_seqlens=torch.tensor([99, 2], dtype=torch.int32, device=c["q"].device)), r"cache_seqlens.*\[0, L_max = 12\]"),
        (lambda c: c.update(r=c["r"][:, :, :1, :1]), "`r` must be shaped like `q`"),
        (lambda c: c.update(k=torch.cat([c["k"], c["k"][:, :1]], 1), v=torch.cat([c["v"], c["v"][:, :1]], 1)),
         "multiple of num_kv_heads"),
        (lambda c: c.update(k=c["k"][..., :8]), "head_dim of `k_cache`"),
        (lambda c: c.update(v=c["v"].half()), "`v_cache` has dtype"),
        (lambda c: c.update(q=c["q"][0]), "`q` must have 4 dims"),
        (lambda c: c.update(window_size=0), "window_size"),
        (lambda c: c.update(block_table=torch.zeros(2, 3, dtype=torch.int64, device=c["q"].device)), "block_table.*int32"),
        (lambda c: c.update(block_table=torch.full((2, 3), 7, dtype=torch.int32, device=c["q"].device)), r"block_table.*\[0, num_blocks"),
    ],
    ids=["seqlens-int64", "seqlens-shape", "seqlens-range", "r-shape", "gqa", "head-dim", "dtype", "rank",
         "window", "table-dtype", "table-range"],
)
def test_with_kvcache_argument_errors(change, match):
    c = make_case(5, 2, 4, 2, 1, 16, [12, 3], 12)
    c["window_size"] = None
    change(c)
    with pytest.raises((ValueError, TypeError), match=match):
        parallax_attention_with_kvcache(c["q"], c["r"], c["k"], c["v"], cache_seqlens=c["cache_seqlens"],
                                        block_table=c.get("block_table"), window_size=c["window_size"])


def test_with_kvcache_check_values_false_skips_only_the_range_checks():
    """``check_values=False`` (the vLLM backend's per-layer call): the same output, no host sync
    (``aten._local_scalar_dense``, which the default range checks need); shape errors still raised."""
    from graph_tools import HostSyncs

    c = make_case(7, 3, 6, 2, 1, 16, [11, 1, 17], 20, block_size=4)
    want = _call(parallax_attention_with_kvcache, c, True, window_size=5)
    with HostSyncs() as checked:
        _call(parallax_attention_with_kvcache, c, True, window_size=5)
    with HostSyncs() as unchecked:
        got = _call(parallax_attention_with_kvcache, c, True, window_size=5, check_values=False)
    assert torch.equal(got, want) and _rel(got, oracle(c, 5)) <= 1e-5
    assert checked.count > 0 and unchecked.count == 0, (checked.count, unchecked.count)
    with pytest.raises(TypeError, match="cache_seqlens.*int32"):
        parallax_attention_with_kvcache(c["q"], c["r"], c["k_pages"], c["v_pages"], block_table=c["block_table"],
                                        cache_seqlens=c["cache_seqlens"].long(), check_values=False)


@pytest.mark.skipif(IN_PROCESS or CUDA or not HAVE_TRITON, reason="runs only when triton was imported before the interpreter flag")
def test_interpreter_subprocess():
    """Re-run this module in a fresh interpreter with ``TRITON_INTERPRET=1`` set before triton loads."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "triton_decode",
         str(Path(__file__).resolve())],
        check=False, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------ GPU grid (H200)

GPU_CASES = [
    # (B, Hq, Hkv, Lq, D, L_max, window, block_size)
    (1, 8, 8, 1, 128, 16384, None, None),
    (4, 32, 8, 1, 128, 4096, None, None),
    (3, 32, 8, 1, 128, 5120, None, 256),
    (2, 8, 1, 4, 128, 3000, 512, None),
    (2, 4, 1, 1, 256, 2048, 512, 16),
    (5, 16, 4, 2, 64, 1152, None, 64),
    (2, 8, 8, 1, 96, 777, 100, None),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b,hq,hkv,lq,d,l_max,window,bs", GPU_CASES, ids=[str(c) for c in GPU_CASES])
def test_gpu_decode_grid(b, hq, hkv, lq, d, l_max, window, bs, dtype):
    g = torch.Generator().manual_seed(b * 1000 + l_max)
    lens = torch.randint(lq, l_max + 1, (b,), generator=g).tolist()
    lens[0] = l_max
    c = make_case(7, b, hq, hkv, lq, d, lens, l_max, block_size=bs, dtype=dtype, device="cuda")
    out = _call(parallax_attention_with_kvcache, c, bs is not None, window_size=window)
    assert _rel(out, oracle(c, window)) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_decode_cuda_graph_replay():
    """The entry point can be captured in a CUDA graph (no host sync inside) and replays exactly."""
    c = make_case(11, 4, 32, 8, 1, 128, [4096, 100, 3000, 1], 4096, block_size=64, dtype=torch.bfloat16,
                  device="cuda")
    fn = lambda: _call(parallax_attention_with_kvcache, c, True)
    eager = fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    c["q"].copy_(c["q"] * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(out, oracle(c)) <= TOL[torch.bfloat16]
    assert not torch.equal(out, eager)  # the replay saw the new q
