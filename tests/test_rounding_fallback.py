"""The fp32 fallback of the ``r = 0`` output checks (``checks.within_fp32_rounding``), on every path
that compares a converted model's outputs with the original's: the graph conversion's whole-model
check, ``hf.upgrade`` (``tests/test_probes.py``) and ``verify`` of a Hugging Face directory.

Deep fp32 models amplify rounding past the bare tolerance (Gemma 3 270M upgraded on the H200
host's 16 CPU threads: 1.16e-5 > 1e-5), so each check, when the bare tolerance fails, runs the
original model in float64 and accepts when the converted outputs are no farther from it than the
original fp32 outputs are (x1.5). Here the bare check is made to fail (tolerance 1e-12 or a patched
first comparison), the fallback must accept the exact conversion, and a real change of the outputs
(1 + 1e-3 on the attention) must still be refused.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import parallax_compile as pc
from parallax_compile import checks, hf
from parallax_compile.models import load_model

transformers = pytest.importorskip("transformers")


def test_graph_conversion_accepts_rounding_refuses_real_change(monkeypatch):
    """The graph path's whole-model check: with its bare comparison failing, the fallback keeps
    every site (the old code reverted them all); the fallback refuses outputs off by 1e-3."""
    convert_module = importlib.import_module("parallax_compile.convert")  # `pc.convert` is the function
    real = convert_module.outputs_error
    calls = []

    def first_fails(new, ref, valid=None):
        calls.append(1)
        worst, ok = real(new, ref, valid)
        return worst, ok and len(calls) > 1

    monkeypatch.setattr(convert_module, "outputs_error", first_fails)
    loaded = load_model("nanogpt", seq_len=16)
    gm, info = convert_module.run_conversion(loaded.model, loaded.example_inputs)
    assert calls and len(info.rewritten) == len(info.sites) == 4, [s.reason for s in info.sites]

    from parallax_compile.passes.capture import capture, original_float64

    cap = capture(loaded.model, loaded.example_inputs)
    exact = original_float64(loaded.model, cap)
    with torch.no_grad():
        ref, out = cap.run(), gm(*cap.args, **cap.kwargs)
    assert exact.dtype == torch.float64 and ref.dtype == torch.float32
    assert checks.within_fp32_rounding(out, ref, exact)
    assert not checks.within_fp32_rounding(out * (1 + 1e-3), ref, exact)
    assert not checks.within_fp32_rounding(out, ref, None)  # no float64 run: no fallback


def test_hf_verify_accepts_rounding_refuses_real_change(monkeypatch, tmp_path):
    """``verify`` of a saved upgraded Gemma 3 (per-head q-norm, 2 layers) with the fp32 tolerance
    forced to 1e-12: OK through the fallback (the old code reported "output differs"); with the
    attention's outputs scaled by 1 + 1e-3 the fallback refuses."""
    from parallax_compile.hf import attention

    loaded = load_model("tiny-gemma3", seq_len=16)
    hf.upgrade(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
               valid_positions=loaded.valid_positions)
    loaded.model.save_pretrained(tmp_path / "g")
    monkeypatch.setitem(checks.TOLERANCE, torch.float32, 1e-12)
    report = pc.verify(tmp_path / "g")
    assert report.output_error > 1e-12  # the bare check failed: the fallback decided
    assert report.ok, report.problems

    real = attention.parallax_attention
    monkeypatch.setattr(attention, "parallax_attention", lambda q, *a, **k: real(q, *a, **k) * (1 + 1e-3))
    report = pc.verify(tmp_path / "g")
    assert any("output differs" in p for p in report.problems), report.problems
