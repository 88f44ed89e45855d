"""Converted Hugging Face causal LMs stay transformers models (:mod:`parallax_compile.hf`).

Per tiny family (Llama GQA + RoPE, Qwen3 q-norm, Mistral sliding window, Gemma 3 q/k-norm +
window + scale, GPT-2 fused ``c_attn``, OPT scale folded into ``q_proj``, Phi-3 fused ``qkv_proj``
+ partial rotary, GPT-NeoX per-head fused QKV + partial rotary): the graph passes find the sites
and the upgrade verifies them; ``generate()``
with a left-padded batch at ``W_R = 0`` gives the unconverted model's tokens; with random probes,
left padding changes nothing at the non-padding positions, the KV-cache decode (through
``parallax_attention_with_kvcache``) equals recomputing the whole prefix, and ``save_pretrained`` /
``from_pretrained`` gives the same model back. Gemma 3 270M (real weights, ``real_model``): greedy
generation of 64 tokens token for token equal to the unconverted model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import parallax_compile
from parallax_compile import hf
from parallax_compile.hf import attention as hf_attention
from parallax_compile.models import load_model

from graph_tools import switch_on_probes

FAMILIES = ["llama", "qwen3", "mistral", "gemma3", "gpt2", "opt", "phi3", "gpt_neox"]


@pytest.fixture(scope="module", params=FAMILIES)
def upgraded(request):
    """(family, original model, upgraded model with random probes, example inputs)."""
    loaded = load_model(f"tiny-{request.param}", seq_len=12)
    original = copy.deepcopy(loaded.model)
    info = hf.upgrade(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                      valid_positions=loaded.valid_positions)
    owners = [s.module_path for s in info.rewritten]
    assert len(owners) == 2 and owners == [s.module_path for s in info.sites]
    assert info.max_output_error <= 1e-5
    return request.param, original, loaded.model, loaded.example_inputs


def _prompt(vocab, lengths, seed=1):
    """Left-padded ids and mask, rows of the given lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, n - length:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def test_generate_at_zero_probe_is_the_original(upgraded):
    _family, original, model, _ = upgraded
    for p in (p for n, p in model.named_parameters() if n.endswith(("r_proj.weight", "r_gain"))):
        p.data.zero_()
    ids, mask = _prompt(model.config.vocab_size, [9, 5])
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    want = original.generate(input_ids=ids, attention_mask=mask, **kw)
    got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)
    assert model.config._attn_implementation == "parallax"


@pytest.mark.parametrize("n_prompt", [1, 7])
def test_generate_with_a_static_cache_at_zero_probe(upgraded, n_prompt):
    """A static cache hands the attention the whole pre-allocated cache (empty slots included) and
    no mask at prefill: the Parallax path must still see only the real keys, like SDPA."""
    _family, original, model, _ = upgraded
    for p in (p for n, p in model.named_parameters() if n.endswith(("r_proj.weight", "r_gain"))):
        p.data.zero_()
    ids, _ = _prompt(model.config.vocab_size, [n_prompt])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "cache_implementation": "static"}
    with torch.no_grad():
        want = original.generate(input_ids=ids, **kw)
        got = model.generate(input_ids=ids, **kw)
    assert torch.equal(got, want)


def test_probes_change_the_output(upgraded):
    _, original, model, _ = upgraded
    switch_on_probes(model)
    ids, mask = _prompt(model.config.vocab_size, [9, 9])
    with torch.no_grad():
        a = original(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() > 1e-3  # the probes are live: r goes through the module's q chain


def test_left_padding_matches_unpadded_rows(upgraded):
    _, _, model, _ = upgraded
    switch_on_probes(model, seed=2)
    ids, mask = _prompt(model.config.vocab_size, [10, 6], seed=3)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # GPT-2's learned positions count from the first real token
        batch = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        alone = model(input_ids=ids[1:, 4:], attention_mask=mask[1:, 4:], position_ids=pos[1:, 4:]).logits
    assert torch.allclose(batch[1, 4:], alone[0], atol=2e-5, rtol=1e-4)


def test_kv_cache_decode_equals_recompute(upgraded, monkeypatch):
    """Greedy decode with the KV cache (decode steps through parallax_attention_with_kvcache)
    gives the same tokens and logits as recomputing the whole prefix every step."""
    _, _, model, _ = upgraded
    switch_on_probes(model, seed=4)
    calls = []
    real = hf_attention.parallax_attention_with_kvcache

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "parallax_attention_with_kvcache", counting)
    ids, mask = _prompt(model.config.vocab_size, [11, 11], seed=5)  # no padding: the kvcache path
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "output_logits": True, "return_dict_in_generate": True}
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    n_calls = len(calls)
    fresh = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert n_calls == 7 * model.config.num_hidden_layers  # every decode step, every layer
    assert len(calls) == n_calls  # recompute never takes the decode path
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.logits, fresh.logits):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_save_pretrained_round_trip(upgraded, tmp_path):
    _, _, model, _ = upgraded
    switch_on_probes(model, seed=6)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["parallax_probes"] == {o: list(model.get_submodule(o).r_proj.weight.shape) for o in cfg["parallax_probes"]}
    assert len(cfg["parallax_probes"]) == 2
    loaded = hf.from_pretrained(tmp_path).eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids, mask = _prompt(model.config.vocab_size, [8, 4], seed=7)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kw),
                       loaded.generate(input_ids=ids, attention_mask=mask, **kw))


def test_upgrading_twice_is_refused(upgraded):
    _, _, model, inputs = upgraded
    with pytest.raises(ValueError, match="already upgraded"):
        hf.upgrade(model, inputs)


@pytest.mark.parametrize("family", ["bloom", "gpt_neo", "falcon"])
def test_families_without_attention_interface_are_refused_with_the_alternative(family):
    """One line naming the family and the graph path, not a TypeError; the model is unchanged."""
    loaded = load_model(f"tiny-{family}", seq_len=8)
    with pytest.raises(hf.NotUpgradable, match=rf"\({family}\) does not route attention through .*parallax_compile.convert"):
        hf.upgrade(loaded.model, loaded.example_inputs)
    assert loaded.model.config._attn_implementation != "parallax" and not hasattr(loaded.model.config, "parallax_probes")


def test_the_probe_chain_is_checked_against_the_query_chain(monkeypatch):
    """A probe chain that misses the rotary embedding (here: forced) is caught by the upgrade's
    W_R = W_Q check, which a W_R = 0 check cannot see; the model is left as it was."""
    import sys

    upgrade_module = sys.modules["parallax_compile.hf.upgrade"]  # `hf.upgrade` is the function
    real = upgrade_module.probe_heads
    monkeypatch.setattr(upgrade_module, "probe_heads", lambda owner, x, pe=None: real(owner, x, None))
    loaded = load_model("tiny-gpt_neox", seq_len=8)
    with pytest.raises(hf.NotUpgradable, match="does not reproduce the module's query chain"):
        hf.upgrade(loaded.model, loaded.example_inputs)
    assert loaded.model.config._attn_implementation != "parallax"
    assert not any("r_proj" in n for n, _ in loaded.model.named_parameters())


def test_upgrade_of_a_model_called_with_input_ids_only():
    """Default ``use_cache`` (config True), called as ``model(input_ids)``: upgraded, and generate works."""
    loaded = load_model("tiny-opt", seq_len=8)
    original = copy.deepcopy(loaded.model)
    assert loaded.model.config.use_cache
    ids = loaded.example_inputs["input_ids"][:1]
    info = hf.upgrade(loaded.model, ids)
    assert len(info.rewritten) == 2
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(loaded.model.generate(input_ids=ids, **kw), original.generate(input_ids=ids, **kw))


def test_from_pretrained_refuses_a_plain_model(tmp_path):
    loaded = load_model("tiny-llama", seq_len=8)
    loaded.model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="parallax_probes"):
        hf.from_pretrained(tmp_path)


def test_cli_convert_writes_a_hf_directory(tmp_path):
    from click.testing import CliRunner

    from parallax_compile.cli import main

    src = tmp_path / "src"
    load_model("tiny-qwen3", seq_len=8).model.save_pretrained(src)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--seq-len", "10"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "2 attention site(s) found, 2 rewritten" in res.output
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    model = hf.from_pretrained(out)
    assert isinstance(model, transformers.Qwen3ForCausalLM) and parallax_compile is not None
    res = CliRunner().invoke(main, ["verify", str(out)], catch_exceptions=False)
    assert res.exit_code == 0 and "OK" in res.output, res.output


# ------------------------------------------------------------------ Gemma 3 270M, real weights


@pytest.fixture(scope="module")
def gemma():
    loaded = load_model("gemma3-270m", seq_len=16)
    return loaded


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma3_270m_greedy_64_tokens_identical(gemma):
    """W_R = 0: 64 greedy tokens equal to the unconverted model's (CPU, fp32), left-padded batch."""
    model = gemma.model
    ids, mask = gemma.example_inputs["input_ids"], gemma.example_inputs["attention_mask"]
    assert not bool(mask.all())  # row 1 is left-padded
    prompts = [(ids, mask)]
    kw = {"max_new_tokens": 64, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = [model.generate(input_ids=i, attention_mask=m, **kw) for i, m in prompts]
    info = hf.upgrade(model, gemma.example_inputs, dynamic_dims=gemma.dynamic_dims,
                      valid_positions=gemma.valid_positions)
    assert len(info.rewritten) == 18
    with torch.no_grad():
        got = [model.generate(input_ids=i, attention_mask=m, **kw) for i, m in prompts]
    for g, w in zip(got, want):
        assert g.shape[1] == ids.shape[1] + 64
        assert torch.equal(g, w), (g != w).nonzero()[:5]


# ------------------------------------------------------------------ GPU (H200): decode kernel inside generate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_generate_uses_the_decode_kernel(family, monkeypatch):
    """On CUDA, fp32: W_R = 0 generation equals the unconverted model's; with random probes the
    cached decode (Triton split-KV kernel) equals recomputing the prefix."""
    loaded = load_model(f"tiny-{family}", seq_len=12)
    original = copy.deepcopy(loaded.model).cuda()
    hf.upgrade(loaded.model, loaded.example_inputs, valid_positions=loaded.valid_positions)
    model = loaded.model.cuda()
    calls = []
    real = hf_attention.parallax_attention_with_kvcache
    monkeypatch.setattr(hf_attention, "parallax_attention_with_kvcache",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask = (t.cuda() for t in _prompt(model.config.vocab_size, [11, 11], seed=9))
    kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kw),
                       original.generate(input_ids=ids, attention_mask=mask, **kw))
    assert calls
    switch_on_probes(model, seed=10)
    kw |= {"output_logits": True, "return_dict_in_generate": True}
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
    fresh = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.logits, fresh.logits):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
