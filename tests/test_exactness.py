"""No silent wrong rewrites, no crashes on valid inputs (issue 13): one test per defect.

Fill-style masks set the logit (a fully filled row gets uniform weights), verification runs
synthesized adversarial masks, decode never reads cache slots past ``cache_seqlens``, a masked
key's NaN stays out of the output, the report's dynamic dims are the truth, rank mismatches are
skipped, the backward accepts what the forward accepts, ``hf.upgrade`` leaves a model sharing its
config alone, the decode step compiles with ``fullgraph=True``, exported modules convert, errors
name the argument, and unrecognised softmax(q k^T) appears in the report.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parallax_compile as pc
from parallax_compile.passes.capture import capture


def _heads(x, h):
    b, l, c = x.shape
    return x.view(b, l, h, c // h).transpose(1, 2)


class FillAttention(nn.Module):
    """nanoGPT-style attention with ``masked_fill(~keep, fill)``, ``keep = tril & ~pad``."""

    def __init__(self, c=16, h=2, fill=-1e9):
        super().__init__()
        self.qkv, self.o, self.h, self.fill = nn.Linear(c, 3 * c), nn.Linear(c, c), h, fill

    def forward(self, x, pad):
        b, l, c = x.shape
        q, k, v = (_heads(t, self.h) for t in self.qkv(x).split(c, 2))
        att = q @ k.transpose(-2, -1) / math.sqrt(c // self.h)
        keep = torch.tril(torch.ones(l, l, dtype=torch.bool)) & ~pad[:, None, :, None]
        att = att.masked_fill(~keep, self.fill)
        return self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(b, l, c))


def _convert(model, inputs, **kw):
    torch.manual_seed(0)
    return pc.convert(model, inputs, **kw)


def _close(a, b, tol=1e-5):
    both_nan = a.isnan() & b.isnan()
    assert torch.equal(a.isnan(), b.isnan()), "NaN positions differ"
    d = (a - b).abs().masked_fill(both_nan, 0).max().item()
    assert d <= tol * max(1.0, b.nan_to_num().abs().max().item()), d


# --- 1. fill = set --------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [-1e9, torch.finfo(torch.float32).min, -math.inf])
def test_fill_mask_sets_the_logit_on_padding_rows(fill):
    torch.manual_seed(0)
    m = FillAttention(fill=fill).eval()
    x, pad = torch.randn(2, 7, 16), torch.zeros(2, 7, dtype=torch.bool)
    conv = _convert(m, (x, pad))
    assert [s.rewritable for s in conv.meta["parallax"].sites] == [True]
    pad2 = pad.clone()
    pad2[1, :3] = True  # query rows 0..2 of sequence 1 have every key filled
    x2 = torch.randn(2, 7, 16)
    _close(conv(x2, pad2), m(x2, pad2))


class OrderedFills(nn.Module):
    """A later finite fill overrides an earlier -inf fill; an additive term after a fill."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, a, b, bias):
        q, k, v = (_heads(p(x), 2) for p in (self.q, self.k, self.v))
        s = q @ k.transpose(-1, -2) * 0.5
        s = s.masked_fill(a, -math.inf)
        s = torch.where(b, torch.finfo(s.dtype).min, s)
        s = s + bias
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)


def test_later_fill_overrides_earlier_fill():
    torch.manual_seed(1)
    m = OrderedFills().eval()
    x, bias = torch.randn(2, 5, 8), torch.randn(2, 1, 5, 5)
    a = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    conv = _convert(m, (x, a, a.clone(), bias))
    assert conv.meta["parallax"].sites[0].rewritable
    a2 = torch.rand(2, 1, 5, 5) < 0.5
    a2[0, 0, 1] = True
    b2 = a2.clone()  # the finfo.min fill overrides the -inf fill
    b2[1, 0, 2] = True
    x2, bias2 = torch.randn(2, 5, 8), torch.randn(2, 1, 5, 5)
    _close(conv(x2, a2, b2, bias2), m(x2, a2, b2, bias2))


def test_inf_fill_fully_masked_row_reproduces_nan():
    """softmax over an all -inf row is NaN in the original; the rewrite says the same."""
    m = FillAttention(fill=-math.inf).eval()
    x, pad = torch.randn(2, 7, 16), torch.zeros(2, 7, dtype=torch.bool)
    conv = _convert(m, (x, pad))
    pad2 = pad.clone()
    pad2[0, :2] = True
    _close(conv(x, pad2), m(x, pad2))


class AdditiveOnlyFinite(nn.Module):
    """``scores + mask`` where the model *means* a fill (``finfo.min``) -- exact as an addition."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, keep):
        q, k, v = (_heads(p(x), 2) for p in (self.q, self.k, self.v))
        bias = (1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min
        s = q @ k.transpose(-1, -2) * 0.5 + bias
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)


def test_additive_finfo_min_fully_masked_row_is_uniform_like_fp32():
    """The op's CPU fp64 accumulation rounds ``logits + mask`` to fp32 as the model does."""
    m = AdditiveOnlyFinite().eval()
    x, keep = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    conv = _convert(m, (x, keep))
    assert conv.meta["parallax"].sites[0].rewritable
    keep2 = keep.clone()
    keep2[0] = 0
    _close(conv(x, keep2), m(x, keep2))


class BrokenFillRewrite(FillAttention):
    pass


def test_verification_runs_adversarial_masks(monkeypatch):
    """A rewrite that is exact on the example inputs only (fill treated as -inf) is caught by the
    synthesized fully masked rows, and the site is reported skipped."""
    from parallax_compile.passes import match

    real = match._fill_term
    monkeypatch.setattr(match, "_fill_term", lambda cond, value, negate: real(cond, -math.inf, negate=negate))
    m = FillAttention(fill=-1e9).eval()
    info = _convert(m, (torch.randn(2, 7, 16), torch.zeros(2, 7, dtype=torch.bool))).meta["parallax"]
    assert not info.sites[0].rewritable
    assert "synthesized mask" in info.sites[0].reason


# --- 2. NaN in unused cache slots / masked keys -----------------------------------------------


def test_decode_ignores_slots_past_cache_seqlens():
    torch.manual_seed(0)
    q, r = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
    kc, vc = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    lens = torch.tensor([5, 7], dtype=torch.int32)
    ref = pc.parallax_attention_with_kvcache(q, r, kc, vc, cache_seqlens=lens)
    for b, n in enumerate(lens.tolist()):
        kc[b, :, n:], vc[b, :, n:] = float("nan"), float("inf")
    out = pc.parallax_attention_with_kvcache(q, r, kc, vc, cache_seqlens=lens)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_masked_key_nan_does_not_reach_the_output():
    torch.manual_seed(0)
    q, r, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(4))
    ref = pc.parallax_attention(q, r, k, v, causal=True)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[..., 3, :], v2[..., 3, :] = float("nan"), float("nan")  # seen by row 3 only
    out = pc.parallax_attention(q, r, k2, v2, causal=True)
    torch.testing.assert_close(out[..., :3, :], ref[..., :3, :])
    assert out[..., 3, :].isnan().all()
    k2.requires_grad_(), v2.requires_grad_()
    out = pc.parallax_attention(q, r, k2, v2, causal=True)
    out[..., :3, :].sum().backward()
    assert torch.isfinite(q.grad[..., :3, :]).all() and torch.isfinite(r.grad[..., :3, :]).all()


# --- 3. dynamic dims: the report says the truth -----------------------------------------------


class SDPABlock(nn.Module):
    def __init__(self, c=32, h=2):
        super().__init__()
        self.q, self.k, self.v, self.h = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c), h

    def forward(self, x):
        b, l, c = x.shape
        q, k, v = (_heads(p(x), self.h) for p in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, l, c)


def test_sequence_length_equal_to_head_dim_stays_dynamic():
    """L = 16 = head_dim: a pass used to compare L with a static 16 and pin it."""
    m = SDPABlock().eval()
    conv = _convert(m, torch.randn(2, 16, 32))
    info = conv.meta["parallax"]
    assert info.dynamic, info.note
    x = torch.randn(3, 9, 32)
    torch.testing.assert_close(conv(x), m(x))


class TiedToHeadDim(SDPABlock):
    """Tracing equates L with the static head_dim (``x[..., :L]`` on a 16-wide tensor)."""

    def forward(self, x):
        b, l, c = x.shape
        y = super().forward(x)
        return y[..., :16] + torch.ones(16)[:l]


def test_a_dim_export_ties_to_a_constant_is_reported_static():
    info = _convert(TiedToHeadDim().eval(), torch.randn(2, 16, 32)).meta["parallax"]
    assert not info.dynamic
    assert "x dim 1 = 16" in info.note


def test_dynamic_dims_by_name_for_a_positional_input():
    cap = capture(SDPABlock().eval(), (torch.randn(2, 6, 32),), dynamic_dims={"x": {0: "batch"}})
    assert cap.dynamic_shapes == {"x": {0: torch.export.Dim.AUTO}}
    with pytest.raises(ValueError, match="dynamic_dims: 'y' is not an input"):
        capture(SDPABlock().eval(), (torch.randn(2, 6, 32),), dynamic_dims={"y": {0: "batch"}})


# --- 4. ranks -------------------------------------------------------------------------------


class Memory(nn.Module):
    """Attention over a learned memory ``[H, M, D]`` (3-D k/v, 4-D q), and the reverse."""

    def __init__(self, reverse=False):
        super().__init__()
        self.q, self.mem, self.reverse = nn.Linear(8, 8), nn.Parameter(torch.randn(2, 5, 4)), reverse

    def forward(self, x):
        q = _heads(self.q(x), 2)
        if self.reverse:
            kv = self.mem.expand(x.shape[0], 2, 5, 4)
            return F.scaled_dot_product_attention(q[0], kv, kv)
        return F.scaled_dot_product_attention(q, self.mem, self.mem)


@pytest.mark.parametrize("reverse", [False, True])
def test_rank_mismatch_is_skipped_with_a_reason(reverse):
    sites = pc.find_attention(Memory(reverse).eval(), torch.randn(2, 3, 8))
    assert len(sites) == 1 and not sites[0].rewritable
    assert "dims" in sites[0].reason


# --- 5. backward on empty inputs ------------------------------------------------------------


def test_backward_with_no_keys():
    q, r = (torch.randn(1, 2, 3, 4, requires_grad=True) for _ in range(2))
    k, v = (torch.randn(1, 1, 0, 4, requires_grad=True) for _ in range(2))
    m = torch.randn(1, 1, 3, 0, requires_grad=True)
    pc.parallax_attention(q, r, k, v, attn_mask=m).sum().backward()
    assert q.grad.abs().sum() == 0 and r.grad.abs().sum() == 0 and k.grad.shape == k.shape


def test_backward_with_no_queries_and_a_learned_mask():
    q, r = (torch.randn(1, 2, 0, 4, requires_grad=True) for _ in range(2))
    k, v = (torch.randn(1, 1, 3, 4, requires_grad=True) for _ in range(2))
    m = torch.randn(1, 2, 0, 3, requires_grad=True)
    pc.parallax_attention(q, r, k, v, attn_mask=m).sum().backward()
    assert m.grad.shape == m.shape and k.grad.abs().sum() == 0


# --- 6-7. Hugging Face -----------------------------------------------------------------------


def test_upgrade_leaves_a_model_sharing_the_config_alone():
    transformers = pytest.importorskip("transformers")
    from parallax_compile import hf

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    a, b = transformers.LlamaForCausalLM(cfg).eval(), transformers.LlamaForCausalLM(cfg).eval()
    hf.upgrade(a, {"input_ids": torch.randint(0, 64, (1, 6))})
    assert getattr(b.config, "parallax_probes", None) is None
    assert b.config._attn_implementation == "sdpa"
    assert a.config.parallax_probes


def test_decode_attention_compiles_fullgraph():
    """One decode step of the HF attention function (a static cache's bool mask, and none), and the
    kvcache entry point: no graph break, no host sync. The whole model's decode step under Inductor
    and CUDA graphs: ``tests/test_hf_compiled_decode.py``."""
    from parallax_compile.hf.attention import parallax_attention_forward

    module = nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 7:] = False

    def step(q, k, v, mask):
        with torch.no_grad():
            return parallax_attention_forward(module, q, k, v, mask, scaling=0.3)[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, mask), step(q, k, v, mask))
    torch.testing.assert_close(compiled(q, k, v, None), step(q, k, v, None))
    lens = torch.tensor([7, 9], dtype=torch.int32)
    kv = torch.compile(lambda q, k, v, lens: pc.parallax_attention_with_kvcache(q, q, k, v, cache_seqlens=lens),
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(kv(q, k, v, lens), pc.parallax_attention_with_kvcache(q, q, k, v, cache_seqlens=lens))


# --- 8-9. inputs and errors -----------------------------------------------------------------


def test_convert_an_exported_module():
    m, x = SDPABlock().eval(), torch.randn(2, 5, 32)
    exported = torch.export.export(m, (x,)).module()
    conv = _convert(exported, (x,))
    assert conv.meta["parallax"].sites[0].rewritable
    torch.testing.assert_close(conv(x), m(x))


def test_keyword_call_of_a_positional_signature():
    m, x = SDPABlock().eval(), torch.randn(2, 5, 32)
    conv = _convert(m, (x,))
    torch.testing.assert_close(conv(x=x), m(x))


def test_errors_name_the_argument():
    x = torch.randn(2, 5, 32)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        pc.convert(lambda t: t, (x,))
    with pytest.raises(ValueError, match="probe_init must be one of"):
        pc.convert(SDPABlock().eval(), (x,), probe_init="bogus")
    with pytest.raises(ValueError, match="dynamic_dims: 3 is not an input"):
        pc.convert(SDPABlock().eval(), (x,), dynamic_dims={3: {0: "b"}})


def test_head_dim_zero_is_empty_like_sdpa():
    q = torch.randn(1, 2, 3, 0)
    v = torch.randn(1, 2, 4, 0)
    out = pc.parallax_attention(q, q, torch.randn(1, 2, 4, 0), v)
    assert out.shape == F.scaled_dot_product_attention(q, torch.randn(1, 2, 4, 0), v).shape


# --- 11. unrecognised softmax(q k^T) is reported ----------------------------------------------


class DropoutMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, keep):
        q, k, v = (_heads(p(x), 2) for p in (self.q, self.k, self.v))
        a = (q @ k.transpose(-1, -2) * 0.5).softmax(-1) * keep / 0.9
        return (a @ v).transpose(1, 2).reshape(x.shape)


def test_hand_written_dropout_mask_is_reported():
    sites = pc.find_attention(DropoutMask().eval(), (torch.randn(2, 5, 8), torch.ones(2, 2, 5, 5)))
    assert len(sites) == 1 and not sites[0].rewritable and "q k^T" in sites[0].reason


def test_decomposed_sdpa_is_reported():
    m, x = SDPABlock(8).eval(), torch.randn(2, 5, 8)
    decomposed = torch.export.export(m, (x,)).run_decompositions().module()
    sites = pc.find_attention(decomposed, (x,))
    assert len(sites) == 1 and not sites[0].rewritable and "q k^T" in sites[0].reason


def test_softmax_of_a_projection_is_not_attention():
    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return (x @ self.w).softmax(-1)

    assert pc.find_attention(Router(), torch.randn(2, 3, 8)) == []
