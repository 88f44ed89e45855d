"""The rest of the Hugging Face zoo through the graph path (:func:`parallax_compile.convert`), and
the ``torch.nn`` cross-attention forms.

Per family x implementation x {left-padded batch, no padding}: GPT-NeoX (fused QKV laid out per
head: q's features are strided; partial rotary), Phi-3 (fused ``qkv_proj`` sliced; partial
rotary), OPT (scale folded into ``q_proj``), Falcon (``x @ W.T``; MQA; and the GQA layout of
``new_decoder_architecture``), Bloom (ALiBi by 3-D ``baddbmm``, views around the softmax), GPT-Neo
(fill value through ``detach_``; a local window), Gemma 2 (eager: soft-capped logits, a reported
skip). Every site is rewritten and the model's outputs equal the original's at the non-padding
positions on fresh inputs, or the site is skipped with its reason; the probes get finite
gradients. A causal LM called as users call it (``model(input_ids)``, config ``use_cache=True``)
converts, with the report saying the cache was off for the capture.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from parallax_compile.convert import run_conversion
from parallax_compile.models import IMPLEMENTATIONS, load_model
from parallax_compile.models.torch_nn import CrossMha
from parallax_compile.passes.capture import CACHE_NOTE

transformers = pytest.importorskip("transformers")

FAMILIES = ("gpt_neox", "phi3", "opt", "falcon", "bloom", "gpt_neo")
CASES = [(f, impl, pad) for f in FAMILIES for impl in IMPLEMENTATIONS[f] for pad in ("padded", "unpadded")]
REL_TOL = 1e-5


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _assert_close(new, ref, valid):
    a, b = _logits(new).detach().double(), _logits(ref).detach().double()
    if valid is not None:
        a, b = a[valid], b[valid]
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= REL_TOL * scale, f"max abs error {err:.3e} > {REL_TOL:.0e} * {scale:.3e}"


def _fresh_inputs(loaded, seed):
    """New random ids of the same shape and padding (never the example's values)."""
    inputs = dict(loaded.example_inputs)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, loaded.model.config.vocab_size, inputs["input_ids"].shape, generator=g)
    inputs["input_ids"] = ids.masked_fill(inputs["attention_mask"] == 0, 0)
    return inputs


@pytest.mark.parametrize("family, impl, pad", CASES, ids=[f"{f}-{i}-{p}" for f, i, p in CASES])
def test_family_is_rewritten_exactly(family, impl, pad):
    loaded = load_model(f"tiny-{family}-{impl}", seq_len=12, batch_size=2 if pad == "padded" else 1)
    assert (loaded.valid_positions is not None) == (pad == "padded")
    gm, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                              valid_positions=loaded.valid_positions)
    assert len(info.sites) == 2 and not info.skipped, [s.status for s in info.sites]
    assert info.max_output_error <= REL_TOL
    inputs = _fresh_inputs(loaded, seed=11)
    with torch.no_grad():
        _assert_close(gm(**inputs), loaded.model(**inputs), loaded.valid_positions)
    probes = [p for n, p in gm.named_parameters() if "r_proj" in n or "r_gain" in n]
    assert len([n for n, _ in gm.named_parameters() if n.endswith("r_proj.weight")]) == 2
    loss = _logits(gm(**inputs)).sum()
    grads = torch.autograd.grad(loss, probes)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)


def test_gpt_neox_probe_takes_the_strided_q_features():
    """GPT-NeoX's query_key_value is laid out [H, 3, D]: W_R has H * D rows, not a block."""
    loaded = load_model("tiny-gpt_neox-sdpa", seq_len=10)
    gm, info = run_conversion(loaded.model, loaded.example_inputs, valid_positions=loaded.valid_positions)
    s = info.sites[0]
    assert s.rewritable and "rotary" in s.query_chain
    assert gm.get_parameter(s.probe).shape == (64, 64)  # H * D rows of the 192-wide fused projection
    index = gm.get_buffer(s.probe.rsplit(".", 1)[0] + ".fused_index")
    assert index.shape == (192,) and int((index < 64).sum()) == 64
    # Row h * D + d of W_R takes the place of fused feature h * 3D + d.
    assert [int((index == i).nonzero()) for i in (0, 15, 16, 63)] == [0, 15, 48, 3 * 48 + 15]


def test_falcon_new_architecture_gqa_layout():
    """Falcon's new_decoder_architecture groups [q..., k, v] per KV head: strided q features, GQA."""
    t = transformers
    cfg = t.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_kv_heads=2, new_decoder_architecture=True, pad_token_id=0)
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = t.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
        ids = torch.randint(1, 128, (2, 9))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        gm, info = run_conversion(model, {"input_ids": ids, "attention_mask": mask}, valid_positions=mask.bool())
        assert len(info.rewritten) == 2 and not info.skipped, [s.status for s in info.sites]
        assert {s.num_heads for s in info.sites} == {4}  # K/V arrive expanded to 4 heads (exact, not unwrapped)


def test_bloom_sites_are_found_through_the_views():
    loaded = load_model("tiny-bloom", seq_len=10)
    gm, info = run_conversion(loaded.model, loaded.example_inputs, valid_positions=loaded.valid_positions)
    assert [s.form for s in info.sites] == ["softmax(baddbmm)"] * 2 and len(info.rewritten) == 2
    # Two additive terms: the ALiBi bias [B * H, 1, Lk] (inside baddbmm) and the mask [B, 1, Lq, Lk]
    # added after the view to [B, H, Lq, Lk].
    assert all(s.mask.count("additive") == 2 for s in info.sites), [s.mask for s in info.sites]


def test_gemma2_soft_capping_is_a_reported_skip():
    """Gemma 2 soft-caps the logits (tanh; transformers 5 has only its eager attention): the op has
    no cap, so both sites are skipped with the reason, and the model is unchanged."""
    loaded = load_model("tiny-gemma2-eager", seq_len=12)
    gm, info = run_conversion(loaded.model, loaded.example_inputs, valid_positions=loaded.valid_positions)
    assert len(info.sites) == 2 and not info.rewritten
    assert all("soft-capping" in s.reason for s in info.sites), [s.reason for s in info.sites]
    with torch.no_grad():
        _assert_close(gm(**loaded.example_inputs), loaded.model(**loaded.example_inputs), loaded.valid_positions)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "bloom"])
def test_causal_lm_called_with_input_ids_only(family):
    """``model(input_ids)`` with the config's default use_cache=True converts (no torch.export
    pytree message); the report says the cache was off for the capture; the converted module is
    called the same way."""
    loaded = load_model(f"tiny-{family}", seq_len=9, batch_size=1)
    model, ids = loaded.model, loaded.example_inputs["input_ids"]
    assert model.config.use_cache
    gm, info = run_conversion(model, (ids,))
    assert len(info.rewritten) == 2 and CACHE_NOTE in info.note
    assert model.config.use_cache  # restored
    fresh = torch.randint(1, 128, ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _assert_close(gm(fresh), model(fresh), None)


def test_explicit_use_cache_true_is_one_clear_line():
    loaded = load_model("tiny-opt", seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match=r"^example_inputs: use_cache=True .* pass use_cache=False"):
        run_conversion(loaded.model, {"input_ids": loaded.example_inputs["input_ids"], "use_cache": True})


def test_export_pytree_message_is_not_shown():
    """A model returning an object export cannot trace: the error says what to do instead."""
    class Box:
        def __init__(self, t):
            self.t = t

    class ReturnsObject(nn.Module):
        def forward(self, x):
            return Box(x * 2)

    with pytest.raises(RuntimeError) as e:
        run_conversion(ReturnsObject(), (torch.randn(2, 3),))
    assert "pytree" not in str(e.value) and "returns a `Box`" in str(e.value)


# --- torch.nn cross-attention (issue 13, defect 10) ----------------------------------------------------


def _cross_inputs(seed, lq=5, lk=7, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, lq, 64, generator=g), torch.randn(batch, lk, 64, generator=g)


def test_multihead_attention_cross_attention_is_rewritten():
    """q = x @ in_proj_weight[:E].T (a slice of the fused weight); Lq != Lk."""
    torch.manual_seed(0)
    model = CrossMha().eval()
    gm, info = run_conversion(model, _cross_inputs(0))
    assert len(info.sites) == 1 and info.sites[0].rewritable, info.sites[0].status
    assert gm.get_parameter("attn.r_proj.weight").shape == (64, 64)
    x, mem = _cross_inputs(1, lq=6, lk=11, batch=3)  # fresh inputs, other sizes
    with torch.no_grad():
        torch.testing.assert_close(gm(x, mem), model(x, mem), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the probe is live: it changes the output
        gm.get_parameter("attn.r_proj.weight").normal_()
        for name, p in gm.named_parameters():
            if name.endswith("r_gain"):
                p.fill_(1.0)
        assert (gm(x, mem) - model(x, mem)).abs().max() > 1e-3


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_transformer_decoder_layer_cross_attention_is_rewritten(dropout):
    """The eval-mode ``dropout(train=False)`` in the query chain is not random: both sites rewritten."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(64, 4, dim_feedforward=128, batch_first=True, dropout=dropout).eval()
    gm, info = run_conversion(layer, _cross_inputs(0))
    assert sorted(s.module_path for s in info.rewritten) == ["multihead_attn", "self_attn"], \
        [s.status for s in info.sites]
    x, mem = _cross_inputs(2, lq=4, lk=9)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, mem), layer(x, mem), atol=1e-5, rtol=1e-5)
