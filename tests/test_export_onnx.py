"""ONNX export (issue 6): every Parallax site is one ``ai.parallax::ParallaxAttention`` node plus a
model-local function that stock ONNX Runtime inlines.

* The function body against the float64 reference (SPEC sections 2, 5) for each attribute
  combination in one exported module: GQA, Lq < Lk, causal, window, bool / additive / no mask, a
  row whose every key is masked (0 in ORT, not NaN), run at a batch and lengths other than the
  export's (dynamic dims symbolic), plus the node's statistics outputs against the PyTorch op.
* Converted MiniLM and a converted tiny Llama (GQA 4:2, left padding): ORT equals PyTorch at the
  non-padding positions (fp32: max error <= 1e-5 of the output's max abs), at the export's shapes
  and at other ones; ``onnx.checker`` full check; the custom-domain node and its version.
* fp16 export runs in ORT and stays close to the fp32 model.
* Gemma 3 270M (real weights, ``real_model``): one export at a short length, ORT vs PyTorch.
* Decoders with a KV cache: a tiny Llama upgraded in place; and graph conversions (the default
  nanoGPT, nanoGPT-style toys): the transformed graph fed in chunks equals one full pass, ORT
  token by token equals PyTorch recomputing the whole prefix at every step (live probes, fresh
  prompts of odd lengths, batch > 1), from a saved directory through the CLI too; a graph whose
  positions or attention cannot be cached exactly is refused with one line.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import parallax_compile as pc
from parallax_compile import convert, export_onnx
from parallax_compile.convert import relative_error, run_conversion
from parallax_compile.export.onnx import parallax_nodes, run_onnx
from parallax_compile.export.onnx_function import DOMAIN, DOMAIN_VERSION, OP_TYPE
from parallax_compile.models import load_model
from parallax_compile.reference import parallax_attention_ref

try:
    from graph_tools import switch_on_probes
except ImportError:  # imported by the CLI as `tests.<module>:factory` (the repo root on sys.path)
    from tests.graph_tools import switch_on_probes

REL_TOL = 1e-5  # fp32: max abs error relative to the output's max abs value


def _main(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _symbolic_dims(proto, name: str) -> list:
    (inp,) = [i for i in proto.graph.input if i.name == name]
    return [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]


# --- the function body, one module with every attribute combination ---------------------------------

CASES = [  # (name, causal, window_size, mask kind)
    ("plain", False, None, None),
    ("causal", True, None, None),
    ("window", False, 3, None),
    ("causal_window", True, 4, None),
    ("bool_mask", False, None, "bool"),
    ("additive_mask", True, None, "additive"),
]


class AllForms(torch.nn.Module):
    """Calls the op once per case on shared q, r, k, v (GQA 6:2, Lq < Lk); ``keep`` is a bool
    ``[B, 1, Lq, Lk]`` mask, ``bias`` an additive ``[B, Hq, Lq, Lk]`` one."""

    def forward(self, q, r, k, v, keep, bias):
        outs = []
        for _, causal, window, mask in CASES:
            m = keep if mask == "bool" else bias if mask == "additive" else None
            outs.append(torch.ops.parallax.attention(q, r, k, v, m, 0.3, causal, window)[0])
        stats = torch.ops.parallax.attention(q, r, k, v, keep, 0.3, True, 2)  # all four outputs
        return (*outs, *stats)


def _forms_inputs(b: int, lq: int, lk: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, r = (torch.randn(b, 6, lq, 8, generator=g) for _ in range(2))
    k, v = torch.randn(b, 2, lk, 8, generator=g), torch.randn(b, 2, lk, 5, generator=g)
    keep = torch.rand(b, 1, lq, lk, generator=g) > 0.3
    keep[0, 0, 1] = False  # a row with every key masked
    bias = torch.randn(b, 6, lq, lk, generator=g)
    bias[-1, :, 0] = -math.inf  # a fully masked row through the additive mask too
    return q, r, k, v, keep, bias


@pytest.fixture(scope="module")
def forms_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("forms") / "forms.onnx"
    batch, lq, lk = torch.export.Dim("batch"), torch.export.Dim("lq"), torch.export.Dim("lk")
    qd, kd, md = {0: batch, 2: lq}, {0: batch, 2: lk}, {0: batch, 2: lq, 3: lk}
    export_onnx(AllForms(), _forms_inputs(2, 5, 9, seed=0), path,
                dynamic_shapes=(qd, qd, kd, kd, md, md))
    return path


def test_function_body_matches_reference_at_other_shapes(forms_onnx):
    proto = onnx.load(forms_onnx)
    assert _symbolic_dims(proto, "q")[0] != 2 and isinstance(_symbolic_dims(proto, "q")[2], str)
    q, r, k, v, keep, bias = inputs = _forms_inputs(3, 7, 12, seed=1)  # not the export's shapes
    got = run_onnx(forms_onnx, dict(zip(("q", "r", "k", "v", "keep", "bias"), inputs)))
    up = [t.double() for t in (q, r, k, v)]
    for (name, causal, window, mask), out in zip(CASES, got):
        m = keep if mask == "bool" else bias.double() if mask == "additive" else None
        ref = parallax_attention_ref(*up, scale=0.3, causal=causal, window_size=window, attn_mask=m)
        out = torch.from_numpy(out)
        assert torch.isfinite(out).all(), name
        assert relative_error(out.double(), ref) <= REL_TOL, name
        if mask == "bool":
            assert (out[0, :, 1] == 0).all(), "a row with every key masked must be 0"
        if mask == "additive":
            assert (out[-1, :, 0] == 0).all(), "a row with every key masked must be 0"


def test_statistics_outputs_match_the_op(forms_onnx):
    inputs = _forms_inputs(2, 4, 6, seed=2)
    got = run_onnx(forms_onnx, dict(zip(("q", "r", "k", "v", "keep", "bias"), inputs)))[len(CASES):]
    want = torch.ops.parallax.attention(*inputs[:4], inputs[4], 0.3, True, 2)
    for name, a, b in zip(("out", "mu_v", "lse", "c"), got, want):
        a = torch.from_numpy(a)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), name  # lse = +inf on the empty row
        assert relative_error(a[finite].double(), b[finite].double()) <= REL_TOL, name


def test_node_and_function_are_declared(forms_onnx):
    proto = onnx.load(forms_onnx)
    onnx.checker.check_model(proto, full_check=True)
    nodes = parallax_nodes(proto)
    assert len(nodes) == len(CASES) + 1
    assert {(o.domain, o.version) for o in proto.opset_import} >= {(DOMAIN, DOMAIN_VERSION)}
    (fn,) = [f for f in proto.functions if (f.domain, f.name) == (DOMAIN, OP_TYPE)]
    assert list(fn.input) == ["q", "r", "k", "v", "attn_mask"]
    assert list(fn.output) == ["out", "mu_v", "lse", "c"]
    assert {n.domain for n in fn.node} == {""}, "the body uses standard ops only"
    attrs = {n.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes}
    assert attrs[OP_TYPE]["scale"] == pytest.approx(0.3)
    seen = {(onnx.helper.get_attribute_value(a)) for n in nodes for a in n.attribute if a.name == "window_size"}
    assert seen == {0, 2, 3, 4}


def test_bad_opset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(AllForms(), _forms_inputs(1, 3, 3, seed=0), tmp_path / "x.onnx", opset=17)


# --- converted models ----------------------------------------------------------------------------


def _check_model_in_ort(loaded, gm, path, *, other=None):
    proto = onnx.load(path)
    assert parallax_nodes(proto), "no Parallax node in the exported graph"
    ids = _symbolic_dims(proto, "input_ids")
    assert all(isinstance(d, str) for d in ids), f"batch and sequence must stay symbolic, got {ids}"
    for inputs, valid in [(loaded.example_inputs, loaded.valid_positions)] + ([other] if other else []):
        got = torch.from_numpy(run_onnx(path, inputs)[0])
        with torch.no_grad():
            want = _main(gm(**inputs))
        assert got.shape == want.shape
        assert relative_error(got, want, valid) <= REL_TOL


@pytest.fixture(scope="module")
def tiny_llama():
    loaded = load_model("tiny-llama")  # GQA 4:2, left padding on the last row
    gm, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                              valid_positions=loaded.valid_positions)
    assert len(info.rewritten) == 2 and loaded.valid_positions is not None
    return loaded, gm


def test_graph_export_has_optimum_names(tiny_llama, tmp_path):
    """A graph conversion exports with the model's input names, its output fields as output names
    (``logits``, not the last op's ``linear_20``) and Optimum's dim names (not ``s95``); ORT equals
    PyTorch at the export's shapes and at another batch / length."""
    loaded, gm = tiny_llama
    path = export_onnx(gm, path=tmp_path / "llama.onnx")
    proto = onnx.load(path)
    assert [o.name for o in proto.graph.output][0] == "logits"
    assert _symbolic_dims(proto, "input_ids") == ["batch_size", "sequence_length"]
    assert _symbolic_dims(proto, "attention_mask") == ["batch_size", "sequence_length"]
    (logits,) = [o for o in proto.graph.output if o.name == "logits"]
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == [
        "batch_size", "sequence_length", 128]
    other = load_model("tiny-llama", seq_len=27, batch_size=3)  # same weights, other shapes
    _check_model_in_ort(loaded, gm, path, other=(other.example_inputs, other.valid_positions))
    nodes = parallax_nodes(proto)
    assert len(nodes) == 2


def test_tiny_llama_with_live_probes(tiny_llama, tmp_path):
    """Random W_R (the correction branch active, through the model's real q chain): ORT equals
    PyTorch at the export shape and at another batch / length."""
    loaded, gm = tiny_llama
    probes = list(pc.probe_parameters(gm))  # W_R and the gains (zero at conversion)
    saved = [p.detach().clone() for p in probes]
    try:
        switch_on_probes(gm, seed=5)
        path = export_onnx(gm, path=tmp_path / "llama_probes.onnx")
        with torch.no_grad():
            moved = _main(gm(**loaded.example_inputs))
        other = load_model("tiny-llama", seq_len=19, batch_size=3)
        _check_model_in_ort(loaded, gm, path, other=(other.example_inputs, other.valid_positions))
        with torch.no_grad():
            for p in probes:
                p.zero_()
            assert relative_error(moved, _main(gm(**loaded.example_inputs)), loaded.valid_positions) > 1e-3
    finally:
        with torch.no_grad():
            for p, s0 in zip(probes, saved):
                p.copy_(s0)


def test_fp16_export_runs(tiny_llama, tmp_path):
    loaded, gm = tiny_llama
    path = export_onnx(gm, path=tmp_path / "llama16.onnx", fp16=True)
    proto = onnx.load(path)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    got = torch.from_numpy(run_onnx(path, loaded.example_inputs)[0]).float()
    with torch.no_grad():
        want = _main(gm(**loaded.example_inputs))
    assert torch.isfinite(got[loaded.valid_positions]).all()
    assert relative_error(got, want, loaded.valid_positions) <= 1e-2  # fp16 weights and activations


@pytest.mark.real_model
def test_minilm(tmp_path):
    pytest.importorskip("transformers")
    loaded = load_model("minilm")
    gm = convert(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                 valid_positions=loaded.valid_positions)
    path = export_onnx(gm, path=tmp_path / "minilm.onnx")
    assert len(parallax_nodes(onnx.load(path))) == 6
    other = load_model("minilm", seq_len=23, batch_size=3)
    _check_model_in_ort(loaded, gm, path, other=(other.example_inputs, other.valid_positions))


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma3_270m(tmp_path):
    pytest.importorskip("transformers")
    loaded = load_model("gemma3-270m", seq_len=24, batch_size=2)
    gm = convert(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                 valid_positions=loaded.valid_positions)
    path = export_onnx(gm, path=tmp_path / "gemma.onnx")
    assert len(parallax_nodes(onnx.load(path, load_external_data=False))) == 18
    _check_model_in_ort(loaded, gm, path)


# --- the optional fast path (onnxruntime-extensions kernel) ----------------------------------------


def test_fast_path_kernel_replaces_the_function(forms_onnx):
    """The default session runs the function body; with onnxruntime-extensions installed,
    ``fast_path=True`` makes ONNX Runtime use the registered kernel (the PyTorch op itself:
    bit-identical outputs) instead of inlining the function; without it, asking raises ImportError."""
    from parallax_compile.export.ort_kernel import fast_path_available

    inputs = _forms_inputs(2, 4, 6, seed=3)
    feed = dict(zip(("q", "r", "k", "v", "keep", "bias"), inputs))
    want = AllForms()(*inputs)
    body = run_onnx(forms_onnx, feed)
    assert any(not torch.equal(torch.from_numpy(a), b) for a, b in zip(body, want)), "function body expected"
    if not fast_path_available():
        with pytest.raises(ImportError, match="onnxruntime-extensions"):
            run_onnx(forms_onnx, feed, fast_path=True)
        return
    for a, b in zip(run_onnx(forms_onnx, feed, fast_path=True), want):
        assert torch.equal(torch.from_numpy(a), b)


# --- Optimum's layout: a directory, and a decoder with its KV cache ------------------------------


@pytest.fixture(scope="module")
def llama_with_past(tmp_path_factory):
    """tiny Llama upgraded in place, with live probes (random ``r_proj``; ``r_gain`` non-zero where
    the model has one), exported as an Optimum directory with its KV cache."""
    from parallax_compile.export.onnx_dir import export_onnx_dir
    from parallax_compile.hf import upgrade

    loaded = load_model("tiny-llama")
    model = loaded.model
    upgrade(model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims, valid_positions=loaded.valid_positions)
    switch_on_probes(model, seed=7, std=0.2)
    inputs = {k: v for k, v in loaded.example_inputs.items() if k != "use_cache"}
    out = tmp_path_factory.mktemp("llama_onnx")
    report = export_onnx_dir(out, model, inputs, valid=loaded.valid_positions, new_tokens=6)
    return model, inputs, out, report


def test_decoder_directory_layout_and_names(llama_with_past):
    model, _, out, report = llama_with_past
    assert (out / "model.onnx").is_file() and (out / "config.json").is_file()
    layers = model.config.num_hidden_layers
    pairs = [f"{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert report.inputs == ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{p}" for p in pairs]
    assert report.outputs == ["logits"] + [f"present.{p}" for p in pairs]
    assert report.dims["input_ids"] == ["batch_size", "sequence_length"]
    assert report.dims["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert report.dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert report.dims["present.1.value"] == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    assert report.kv_cache and report.parallax_nodes == layers
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


def test_decoder_generates_token_by_token_like_pytorch(llama_with_past):
    """The check export_onnx_dir ran (prompt with left padding, 6 greedy tokens with the cache) and
    a second prompt at another batch and length: tokens equal, first-step logits within 1e-4;
    the probes are live (zeroing them moves the logits), so they were exported."""
    from parallax_compile.export.onnx_decoder import ort_greedy

    model, inputs, out, report = llama_with_past
    assert report.ok and report.tokens_equal and report.generated_tokens == 6
    assert report.error <= 1e-4
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = model.generation_config.pad_token_id
    tokens, first = ort_greedy(str(out / "model.onnx"), ids, mask, 5, eos_token_id=eos,
                               pad_token_id=pad if pad is not None else eos)
    with torch.no_grad():  # a row that emits EOS continues with the pad id, as generate does
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(tokens, want)
    assert relative_error(first, logits, mask.bool()) <= 1e-4
    probes = [p for n, p in model.named_parameters() if "r_proj" in n]
    saved = [p.detach().clone() for p in probes]
    with torch.no_grad():
        for p in probes:
            p.zero_()
        moved = relative_error(model(input_ids=ids, attention_mask=mask).logits, first, mask.bool())
        for p, s0 in zip(probes, saved):
            p.copy_(s0)
    assert moved > 1e-3, "the probes do not change the logits: the test could not see them dropped"


def test_directory_refuses_a_file_name(tmp_path):
    from parallax_compile.export.onnx_dir import export_onnx_dir

    with pytest.raises(ValueError, match="expected a directory"):
        export_onnx_dir(tmp_path / "model.onnx", torch.nn.Linear(2, 2), {})


# --- a causal decoder converted as a graph, with its KV cache ----------------------------------------


class ToyDecoder(torch.nn.Module):
    """One causal block, nanoGPT-style (fused ``c_attn``, a registered ``tril`` buffer sliced to
    the length, ``masked_fill``), with the position form and attention variant under test:
    ``positions``: ``"arange"`` (learned table indexed by ``arange(0, T)``), ``"cumsum"``
    (``cumsum(ones_like(idx)) - 1``) or ``"sliced"`` (a table sliced ``[:T]``); ``attention``:
    ``"masked"``, ``"sdpa"`` (``is_causal=True``) or ``"bidirectional"``; ``mask_input``: the
    forward also takes an ``attention_mask``."""

    def __init__(self, positions="arange", attention="masked", mask_input=False, vocab=50, width=24, heads=3):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.positions, self.attention, self.heads = positions, attention, heads
        self.wte = torch.nn.Parameter(torch.randn(vocab, width, generator=gen) * 0.5)
        self.wpe = torch.nn.Parameter(torch.randn(64, width, generator=gen) * 0.5)
        self.c_attn = torch.nn.Linear(width, 3 * width)
        self.c_proj = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))
        self.example_inputs = {"idx": torch.randint(0, vocab, (2, 9), generator=gen)}
        if mask_input:
            self.example_inputs["attention_mask"] = torch.ones(2, 9, dtype=torch.long)

    def forward(self, idx, attention_mask=None):
        b, t = idx.shape
        if self.positions == "arange":
            pos = torch.nn.functional.embedding(torch.arange(0, t, device=idx.device), self.wpe)
        elif self.positions == "cumsum":
            pos = torch.nn.functional.embedding(torch.cumsum(torch.ones_like(idx), 1) - 1, self.wpe)
        else:
            pos = self.wpe[:t]
        x = torch.nn.functional.embedding(idx, self.wte) + pos
        if attention_mask is not None:
            x = x * attention_mask[..., None]
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        if self.attention == "sdpa":
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if self.attention == "masked":
                att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            y = torch.softmax(att, dim=-1) @ v
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, -1))
        return self.head(x)


def _cli(*args):
    """The command line in a fresh process, output piped."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "parallax_compile.cli", *args], capture_output=True, text=True,
                          timeout=600)


def cumsum_decoder():
    """``tests.test_export_onnx:cumsum_decoder`` for the CLI: positions the KV cache cannot offset."""
    return ToyDecoder(positions="cumsum").eval()


def _convert_toy(**kwargs):
    model = ToyDecoder(**kwargs).eval()
    gm, info = run_conversion(model, model.example_inputs)
    assert len(info.rewritten) == 1, [s.reason for s in info.sites]
    switch_on_probes(gm, seed=1, std=0.3)
    return gm


def _kv_steps_in_torch(kv, prompt, chunks):
    """Run ``kv.module`` over ``prompt`` in ``chunks`` (lengths), feeding ``present`` back; returns
    the logits of every chunk concatenated ``[B, L, vocab]``."""
    b = prompt.shape[0]
    past = [torch.zeros(b, h, 0, d) for h, d in kv.kv_shapes for _ in range(2)]
    logits, at = [], 0
    with torch.no_grad():
        for n in chunks:
            out = kv.module(prompt[:, at:at + n], *past)
            logits.append(out[0])
            past, at = list(out[-len(past):]), at + n
    assert all(p.shape[2] == prompt.shape[1] for p in past), "present must hold every position"
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("attention", ["masked", "sdpa"])
def test_kv_graph_in_pytorch_equals_recomputation(attention):
    """The transformed graph itself (no ONNX), with live probes: the prompt fed in chunks of odd
    lengths with the cache (Lq != Lk, end-aligned causal) gives the logits of one full pass."""
    from parallax_compile.export.graph_decoder import with_kv_cache

    gm = _convert_toy(attention=attention)
    kv = with_kv_cache(gm)
    assert kv.token_input == "idx" and kv.output_names == ["logits"] and kv.kv_shapes == [(3, 8)]
    prompt = torch.randint(0, 50, (3, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = gm(idx=prompt)
    for chunks in ([13], [5, 1, 7], [1] * 13):
        got = _kv_steps_in_torch(kv, prompt, chunks)
        assert relative_error(got, want) <= REL_TOL, chunks


@pytest.mark.parametrize(("kwargs", "reason"), [
    (dict(positions="cumsum"), "aten.cumsum"),
    (dict(positions="sliced"), "slices a table by the sequence length"),
    (dict(attention="bidirectional"), "is not causal"),
    (dict(mask_input=True), "takes 2 tensor inputs (idx, attention_mask)"),
], ids=["cumsum-positions", "sliced-position-table", "bidirectional", "mask-input"])
def test_kv_cache_refused_with_the_reason(kwargs, reason):
    """What the transformation cannot prove exact is refused with one line naming it (the
    directory then gets model.onnx without a cache: test_cli_refuses_the_kv_cache_with_one_line)."""
    from parallax_compile.export.graph_decoder import NoKVCache, with_kv_cache

    model = ToyDecoder(**kwargs).eval()
    gm, info = run_conversion(model, model.example_inputs)
    assert info.rewritten
    with pytest.raises(NoKVCache, match=re.escape(reason)) as refused:
        with_kv_cache(gm)
    assert "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def nanogpt_with_past(tmp_path_factory):
    """The default nanoGPT model converted, with random probes (W_R and r_gain non-zero, as after
    fine-tuning), exported as an Optimum directory with its KV cache."""
    from parallax_compile.export.onnx_dir import export_onnx_dir

    loaded = load_model("nanogpt", seq_len=12, batch_size=2)
    gm, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims)
    assert len(info.rewritten) == 4
    switch_on_probes(gm, seed=2, std=0.3)
    out = tmp_path_factory.mktemp("nanogpt_onnx")
    report = export_onnx_dir(out, gm, loaded.example_inputs, new_tokens=5)
    return gm, out, report


@pytest.mark.slow  # the converted nanoGPT and its export: 20-70 s on 2 cores
def test_graph_decoder_directory_layout_and_names(nanogpt_with_past):
    gm, out, report = nanogpt_with_past
    assert report.kv_cache and report.kv_cache_note is None
    past = [f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")]
    assert report.inputs == ["idx", *past]
    assert report.outputs == ["logits", *[p.replace("past_key_values", "present") for p in past]]
    assert report.dims["idx"] == ["batch_size", "sequence_length"]
    assert report.dims["logits"] == ["batch_size", "sequence_length", 256]
    assert report.dims["past_key_values.0.key"] == ["batch_size", 4, "past_sequence_length", 32]
    assert report.dims["present.3.value"] == ["batch_size", 4, "past_sequence_length + sequence_length", 32]
    assert report.parallax_nodes == 4
    assert report.ok and report.tokens_equal and report.generated_tokens == 5 and report.error <= 1e-4
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


@pytest.mark.slow  # the converted nanoGPT and its export: 20-70 s on 2 cores
def test_graph_decoder_token_by_token_equals_recomputation(nanogpt_with_past):
    """ONNX Runtime, token by token with the cache, on fresh random prompts of odd lengths and
    batch > 1: every step's logits equal PyTorch's on the whole prefix recomputed (within the
    tool's tolerance), the tokens are equal, and a prompt fed in two chunks (Lq > 1 with a past)
    too. The probes are live: zeroing them moves the logits, so a dropped probe would be seen."""
    from parallax_compile.export.graph_decoder import recompute_greedy
    from parallax_compile.export.onnx_decoder import ort_greedy
    from parallax_compile.export.onnx_dir import ORT_TOLERANCE
    from parallax_compile.export.ort_kernel import session as make_session

    gm, out, _ = nanogpt_with_past
    session = make_session(out / "model.onnx", fast_path=False)
    gen = torch.Generator().manual_seed(11)
    for batch, length in [(3, 7), (2, 13)]:
        prompt = torch.randint(0, 256, (batch, length), generator=gen)
        steps = []
        tokens, _ = ort_greedy(session, prompt, None, 6, step_logits=steps)
        want_tokens, want = recompute_greedy(gm, "idx", prompt, 6)
        assert torch.equal(tokens, want_tokens)
        assert len(steps) == 6 and steps[0].shape == (batch, length, 256)
        assert steps[1].shape == (batch, 1, 256)
        for i, (a, b) in enumerate(zip(steps, want)):
            assert relative_error(a, b) <= ORT_TOLERANCE["float32"], f"step {i}"
    names = [i.name for i in session.get_inputs()]
    prompt = torch.randint(0, 256, (3, 11), generator=gen)
    first = dict(zip([o.name for o in session.get_outputs()], session.run(None, {
        "idx": prompt[:, :4].numpy(), **{n: torch.zeros(3, 4, 0, 32).numpy() for n in names[1:]}})))
    second = session.run(None, {"idx": prompt[:, 4:].numpy(),
                                **{n: first[n.replace("past_key_values", "present")] for n in names[1:]}})
    with torch.no_grad():
        full = gm(idx=prompt)
    assert relative_error(torch.from_numpy(second[0]), full[:, 4:]) <= ORT_TOLERANCE["float32"]
    probes = [p for _, p in pc.named_probe_parameters(gm)]
    saved = [p.detach().clone() for p in probes]
    with torch.no_grad():
        for p in probes:
            p.zero_()
        moved = relative_error(gm(idx=prompt), full)
        for p, s0 in zip(probes, saved):
            p.copy_(s0)
    assert moved > 1e-3, "the probes do not change the logits: the test could not see them dropped"


@pytest.mark.slow  # a fresh process converting and exporting: 25-60 s on 2 cores
def test_cli_refuses_the_kv_cache_with_one_line(tmp_path):
    """``export onnx`` of a graph model whose positions cannot be offset (``cumsum``): exit 0,
    model.onnx without a cache, one note line saying why."""
    out = tmp_path / "o"
    proc = _cli("export", "onnx", "tests.test_export_onnx:cumsum_decoder", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "no KV cache" in ln]
    assert len(notes) == 1 and "aten.cumsum" in notes[0], proc.stderr
    report = json.loads(proc.stdout)
    assert not report["kv_cache"] and "cumsum" in report["kv_cache_note"] and report["ok"]
    assert (out / "model.onnx").is_file()


@pytest.mark.slow  # a fresh process converting and exporting: 25-60 s on 2 cores
def test_cli_exports_a_saved_fine_tuned_nanogpt_with_its_cache(nanogpt_with_past, tmp_path):
    """The README's loop for a graph model: a conversion directory with trained (random) probes,
    ``export onnx DIR OUT/`` in a fresh process: KV-cache inputs and outputs, greedy tokens equal to
    PyTorch's recomputation, and the probes in the file are the trained ones."""
    gm, _, _ = nanogpt_with_past
    saved = pc.save(gm, tmp_path / "nanogpt-ft")
    out = tmp_path / "onnx"
    proc = _cli("export", "onnx", str(saved), str(out), "--json", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kv_cache"] and report["tokens_equal"] and report["ok"] and report["generated_tokens"] == 4
    assert report["inputs"][:2] == ["idx", "past_key_values.0.key"]
    assert report["outputs"][-1] == "present.3.value"
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    empty = {f"past_key_values.{i}.{kv}": torch.zeros(2, 4, 0, 32) for i in range(4) for kv in ("key", "value")}
    got = run_onnx(out / "model.onnx", {"idx": prompt, **empty})[0]
    with torch.no_grad():
        want = gm(idx=prompt)
    assert relative_error(torch.from_numpy(got), want) <= 1e-4
