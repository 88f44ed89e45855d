"""Every tiny Hugging Face family x {eager, sdpa}, converted end to end.

For the first seven :data:`parallax_compile.models.TINY_FAMILIES` and both attention implementations: every
attention module of the model is found and rewritten, the converted model's outputs equal the
original's at the non-padding positions (fp32: max abs error <= 1e-5 of the output's max abs),
GQA is kept un-repeated, each probe is ``<owning module>.r_proj.weight`` and in ``state_dict()``,
the converted model runs at another batch size and sequence length, and one backward gives
finite, non-zero probe gradients. Mistral and Gemma 3 run on sequences longer than their sliding
window, and the test checks that the window really cuts keys out of the mask the op receives.

Each (family, implementation) is loaded and converted once (module-scoped fixture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import fx
from torch.utils import _pytree as pytree

from graph_tools import record_parallax_calls

from parallax_compile.convert import ConversionInfo, run_conversion
from parallax_compile.models import TINY_FAMILIES, LoadedModel, load_model

pytest.importorskip("transformers")

IMPLS = ("eager", "sdpa")
CASES = [(fam, impl) for fam in ("gpt2", "llama", "qwen3", "mistral", "bert", "t5", "gemma3") for impl in IMPLS]
# (the other tiny families: tests/test_hf_zoo.py)
REL_TOL = 1e-5  # fp32: max abs error relative to the output's max abs value

# The class of the module that owns one attention (the site's module_path), per family.
ATTENTION_CLASS = {
    "gpt2": "GPT2Attention",
    "llama": "LlamaAttention",
    "qwen3": "Qwen3Attention",
    "mistral": "MistralAttention",
    "bert": "BertSelfAttention",
    "t5": "T5Attention",
    "gemma3": "Gemma3Attention",
}
SLIDING = ("mistral", "gemma3")
OTHER_SEQ_LEN, OTHER_BATCH = 29, 3  # for the dynamic-shape check: both differ from the example's


@dataclass
class Converted:
    family: str
    impl: str
    loaded: LoadedModel
    gm: fx.GraphModule
    info: ConversionInfo


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{i}" for f, i in CASES])
def converted(request) -> Converted:
    family, impl = request.param
    loaded = load_model(f"tiny-{family}-{impl}")
    gm, info = run_conversion(
        loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims, valid_positions=loaded.valid_positions
    )
    return Converted(family, impl, loaded, gm, info)


# --- helpers --------------------------------------------------------------------------------------


def _float_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _main_output(out: Any) -> torch.Tensor:
    """logits / last_hidden_state: the first field of a ModelOutput, or the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _assert_outputs_match(new: Any, ref: Any, valid: torch.Tensor | None) -> None:
    """Every floating-point output leaf: max |new - ref| <= 1e-5 * max |ref|, at ``valid`` [B, L]
    positions for the outputs laid out [B, L, ...]."""
    new_leaves, ref_leaves = _float_leaves(new), _float_leaves(ref)
    assert len(new_leaves) == len(ref_leaves) and ref_leaves
    for a, b in zip(new_leaves, ref_leaves):
        assert a.shape == b.shape
        if valid is not None and tuple(b.shape[:2]) == tuple(valid.shape):
            a, b = a[valid], b[valid]
        a, b = a.detach().double(), b.detach().double()
        assert torch.isfinite(a).all()
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= REL_TOL * scale, f"max abs error {err:.3e} > {REL_TOL:.0e} * {scale:.3e}"


def record_ops(gm: fx.GraphModule, inputs: dict[str, Any]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Run ``gm(**inputs)``; per probe, the q / mask / causal / window its Parallax node received."""
    return record_parallax_calls(
        gm, inputs, lambda a: {"mask": a[4], "causal": a[6], "window": a[7], "q": a[0]})


def allowed_keys(call: dict[str, Any], row: int, query: int) -> torch.Tensor:
    """bool [Lk]: the keys that query ``query`` of batch row ``row`` (head 0) may attend to."""
    mask, q = call["mask"], call["q"]
    lq = q.shape[-2]
    if mask is None:
        lk = lq
        keep = torch.ones(lk, dtype=torch.bool)
    else:
        m = mask.expand(q.shape[0], -1, lq, -1)[row, 0, query]
        keep = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        lk = keep.shape[-1]
    if call["causal"]:
        keep = keep & (torch.arange(lk) <= lk - lq + query)
    if call["window"] is not None:
        keep = keep & (torch.arange(lk) > lk - lq + query - int(call["window"]))
    return keep


def _sliding_layers(family: str, model: torch.nn.Module) -> list[bool]:
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return [t == "sliding_attention" for t in types]
    return [cfg.sliding_window is not None] * cfg.num_hidden_layers


def _layer_index(module_path: str) -> int:
    parts = module_path.split(".")
    return int(parts[parts.index("layers") + 1])


# --- tests ----------------------------------------------------------------------------------------


def test_every_attention_module_is_rewritten(converted: Converted):
    model, info = converted.loaded.model, converted.info
    owners = sorted(n for n, m in model.named_modules() if type(m).__name__ == ATTENTION_CLASS[converted.family])
    cfg = model.config
    if converted.family == "t5":  # encoder self, decoder self + cross per block
        assert len(owners) == cfg.num_layers + 2 * cfg.num_decoder_layers == 6
    else:
        assert len(owners) == cfg.num_hidden_layers == 2
    assert sorted(s.module_path for s in info.sites) == owners
    assert not info.skipped, [s.status for s in info.skipped]
    assert all(s.rewritable and s.reason is None for s in info.sites)
    expected_form = "sdpa" if converted.impl == "sdpa" else "softmax(matmul)"
    assert {s.form for s in info.sites} == {expected_form}
    assert info.max_output_error is not None and info.max_output_error <= REL_TOL


def test_outputs_unchanged_at_valid_positions(converted: Converted):
    loaded = converted.loaded
    ref = loaded.run()
    with torch.no_grad():
        new = converted.gm(**loaded.example_inputs)
    assert type(new) is type(ref)  # same output structure (a ModelOutput for HF models)
    _assert_outputs_match(new, ref, loaded.valid_positions)


def test_heads_gqa_and_probe_names(converted: Converted):
    cfg, info, gm = converted.loaded.model.config, converted.info, converted.gm
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.hidden_size // heads
    state = gm.state_dict()
    params = dict(gm.named_parameters())
    for s in info.sites:
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (heads, kv_heads, head_dim)
        if kv_heads < heads:
            assert s.gqa != "none"  # the op reads the un-repeated K/V
        else:
            assert s.gqa == "none"
        assert s.probe == f"{s.module_path}.r_proj.weight"
        assert s.probe in state and s.probe in params and params[s.probe].requires_grad
        gain = s.probe.replace("r_proj.weight", "r_gain")
        assert bool((state[gain] == 0).all()) and state[gain].shape == (heads,)
        assert state[s.probe].std() > 0  # W_R starts random like W_Q; the zero gain keeps r = 0
        assert params[s.probe].shape[0] == heads * head_dim
    probes = sorted(n for n in state if "r_proj" in n)
    assert probes == sorted(s.probe for s in info.sites)
    if converted.family == "t5":
        assert {s.scale for s in info.sites} == {1.0}  # T5 does not scale the logits
    if converted.family in ("qwen3", "gemma3"):
        assert all("norm" in s.query_chain and "rotary" in s.query_chain for s in info.sites)
    if converted.family in ("llama", "mistral"):
        assert all("rotary" in s.query_chain for s in info.sites)


def test_runs_at_another_batch_and_sequence_length(converted: Converted):
    assert converted.info.dynamic, converted.info.note
    other = load_model(converted.loaded.spec, seq_len=OTHER_SEQ_LEN, batch_size=OTHER_BATCH)
    if converted.family in SLIDING:
        assert OTHER_SEQ_LEN > converted.loaded.model.config.sliding_window
    with torch.no_grad():
        ref = converted.loaded.model(**other.example_inputs)  # same weights, other shapes
        new = converted.gm(**other.example_inputs)
    assert _main_output(new).shape[:2] == (OTHER_BATCH, OTHER_SEQ_LEN // 2 + 1 if converted.family == "t5" else OTHER_SEQ_LEN)
    _assert_outputs_match(new, ref, other.valid_positions)


def test_one_backward_gives_finite_nonzero_probe_gradients(converted: Converted):
    gm, info = converted.gm, converted.info
    out = gm(**converted.loaded.example_inputs)
    gen = torch.Generator().manual_seed(0)
    main = _main_output(out)
    valid = converted.loaded.valid_positions
    weights = torch.randn(main.shape, generator=gen)
    if valid is not None:
        weights = weights * valid[..., None]
    loss = (main * weights).sum()
    # At initialisation the gains (zero) get the gradient; W_R follows once they move (SPEC section 7).
    gains = [s.probe.replace("r_proj.weight", "r_gain") for s in info.sites]
    grads = torch.autograd.grad(loss, [gm.get_parameter(g) for g in gains] + [gm.get_parameter(s.probe) for s in info.sites])
    for name, g in zip(gains, grads):
        assert torch.isfinite(g).all(), name
        assert g.abs().max() > 0, f"{name}: zero gradient"
    assert all(torch.isfinite(g).all() for g in grads[len(gains):])


def test_mask_the_op_receives(converted: Converted):
    """The last query of the unpadded batch row 0 sees every key, except on sliding-window layers
    (Mistral: every layer, Gemma 3: layer 0 of 2; window 8 < 20 tokens), where it sees exactly the
    last ``window`` keys: the window is kept, and it cuts in at the example length."""
    loaded, info = converted.loaded, converted.info
    out, calls = record_ops(converted.gm, loaded.example_inputs)
    _assert_outputs_match(out, loaded.run(), loaded.valid_positions)
    assert set(calls) == {s.probe for s in info.sites}
    sliding = _sliding_layers(converted.family, loaded.model) if converted.family in SLIDING else None
    window = loaded.model.config.sliding_window if sliding else None
    for s in info.sites:
        lq = calls[s.probe]["q"].shape[-2]
        keep = allowed_keys(calls[s.probe], row=0, query=lq - 1)
        if sliding is not None and sliding[_layer_index(s.module_path)]:
            assert len(keep) > window, "the sequence must be longer than the window"
            assert int(keep.sum()) == window and bool(keep[-window:].all()), s.module_path
        else:
            assert bool(keep.all()), s.module_path
    if sliding is not None:
        assert any(sliding) and (converted.family == "mistral" or not all(sliding))


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_changes_the_output(family):
    """With a window wider than the sequence, positions past the window change: it matters."""
    narrow, wide = load_model(f"tiny-{family}-sdpa"), load_model(f"tiny-{family}-sdpa")
    window = narrow.model.config.sliding_window
    wide.model.config.sliding_window = 1000
    a, b = _main_output(narrow.run()), _main_output(wide.run())
    assert a.shape[1] > window
    torch.testing.assert_close(a[0, :window], b[0, :window], atol=1e-5, rtol=0)  # inside the window: same
    assert not torch.allclose(a[0, -1], b[0, -1], atol=1e-4)


# --- gradients of the original weights, and the revert path -------------------------------------------

def _assert_weight_gradients_match(converted: Converted, *, valid_only: bool) -> None:
    """Gradients of every original weight, converted vs original model, for one random linear loss
    on the main output: max abs difference <= 1e-4 of the largest gradient entry of the model
    (relative to the whole model, since some gradients are ~0 in exact arithmetic, e.g. a key bias)."""
    loaded, gm = converted.loaded, converted.gm
    named = [(n, p) for n, p in loaded.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    gen = torch.Generator().manual_seed(0)
    ref_out = _main_output(loaded.model(**loaded.example_inputs))
    weights = torch.randn(ref_out.shape, generator=gen)
    if valid_only and loaded.valid_positions is not None:
        weights = weights * loaded.valid_positions[..., None]
    ref = torch.autograd.grad((ref_out * weights).sum(), params, allow_unused=True)
    new = torch.autograd.grad((_main_output(gm(**loaded.example_inputs)) * weights).sum(), params, allow_unused=True)
    scale = max(b.abs().max().item() for b in ref if b is not None)
    for (name, _), a, b in zip(named, new, ref):
        if b is None:
            continue
        assert a is not None and torch.isfinite(a).all(), name
        err = (a - b).abs().max().item()
        assert err <= 1e-4 * scale, f"{name}: gradient differs by {err:.2e} (largest gradient {scale:.2e})"


def test_weight_gradients_equal_the_original_at_zero_probe(converted: Converted):
    """At W_R = 0 the converted model is the original model, so a loss over *all* its outputs
    (padding included, as the library's own gradient check uses) gives the original's gradients
    for every original weight. In eager attention the left-padded rows of decoder-only LMs see
    only keys masked by an additive finfo.min: every logit of such a row is finfo.min (regression:
    the portable backward once recomputed s = exp(l - lse) with lse = finfo.min + log(d1), which
    rounds log(d1) away, so s was 1 instead of 1/d1 there; fixed in d2c88ad)."""
    _assert_weight_gradients_match(converted, valid_only=False)


def test_weight_gradients_from_valid_positions_equal_the_original(converted: Converted):
    """A loss over the non-padding positions only (what training uses) never reaches the fully
    masked rows: the original weights' gradients equal the original model's."""
    _assert_weight_gradients_match(converted, valid_only=True)


def test_whole_model_check_failure_reverts_sites_cleanly(monkeypatch):
    """When the whole-model check fails after every site passed on its own, every site is reverted
    and the model still runs (regression: the reverts once re-pointed users to attention nodes that
    dead-code elimination had already erased, and FX lint failed; fixed in 657c8ce)."""
    import sys

    convert_module = sys.modules["parallax_compile.convert"]  # `parallax_compile.convert` is the function
    loaded = load_model("tiny-llama-eager")
    # Make the whole-model check fail, as a real output mismatch would: every site must be reverted.
    monkeypatch.setattr(convert_module, "outputs_error", lambda new, ref, valid=None: (1.0, False))
    monkeypatch.setattr(convert_module, "within_fp32_rounding", lambda *a: False)  # not rounding either
    gm, info = run_conversion(
        loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims, valid_positions=loaded.valid_positions
    )
    assert info.sites and not info.rewritten
    assert all("outputs changed" in s.reason for s in info.sites)
    _assert_outputs_match(gm(**loaded.example_inputs), loaded.run(), loaded.valid_positions)
