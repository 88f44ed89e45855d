"""The command line: inspect / convert / verify on the default model, a Hugging Face model
directory and a factory; user mistakes are one line and a non-zero exit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from parallax_compile.cli import main

transformers = pytest.importorskip("transformers")


def factory():
    """A factory for ``tests.test_cli:factory``: returns (module, example inputs)."""
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    torch.manual_seed(0)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), {"src": torch.randn(2, 5, 32)}


def _run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


def test_inspect_default_model():
    result = _run("inspect")
    assert result.exit_code == 0, result.output
    assert "4 attention site(s) found, 4 rewritten" in result.output


def test_inspect_json_factory():
    result = _run("inspect", "tests.test_cli:factory", "--json")
    assert result.exit_code == 0, result.output
    sites = json.loads(result.output)
    assert [s["module_path"] for s in sites] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(s["rewritable"] for s in sites)


def test_convert_then_verify_default(tmp_path):
    out = tmp_path / "nanogpt"
    result = _run("convert", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "model.pt2").exists() and (out / "parallax.json").exists()
    result = _run("verify", str(out))
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_convert_hf_directory(tmp_path, hf_dir):
    out = tmp_path / "llama"
    result = _run("convert", str(hf_dir), "-o", str(out), "--seq-len", "12")
    assert result.exit_code == 0, result.output
    assert "2 attention site(s) found, 2 rewritten" in result.output
    report = json.loads((out / "parallax.json").read_text())
    assert [s["probe"] for s in report["sites"]] == [
        "model.layers.0.self_attn.r_proj.weight", "model.layers.1.self_attn.r_proj.weight"]
    assert _run("verify", str(out)).exit_code == 0
    # A fresh process has not imported transformers: load must still rebuild its output types.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "parallax_compile.cli", "verify", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_load_keeps_tied_weights_tied(tmp_path):
    import parallax_compile as pc
    from parallax_compile.models import load_model

    loaded = load_model("nanogpt", seq_len=16)
    gm = pc.convert(loaded.model, loaded.example_inputs)
    pc.save(gm, tmp_path / "n")
    back = pc.load(tmp_path / "n")
    assert len(list(back.parameters())) == len(list(gm.parameters()))
    assert back.get_parameter("lm_head.weight") is back.get_parameter("transformer.wte.weight")


def test_verify_detects_a_model_that_is_no_longer_the_original(tmp_path):
    """verify must fail when the saved model at W_R = 0 does not reproduce the original outputs."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "m"
    assert _run("convert", "tests.test_cli:factory", "-o", str(out)).exit_code == 0
    ref = load_file(out / "reference.safetensors")
    ref["output.0"] = -ref["output.0"]  # what the original model computed, tampered with
    save_file(ref, out / "reference.safetensors")
    result = _run("verify", str(out))
    assert result.exit_code == 1
    assert "differs from the original" in result.output


def test_verify_after_full_fine_tuning_says_the_zero_probe_check_does_not_apply(tmp_path):
    import parallax_compile as pc

    module, inputs = factory()
    gm = pc.convert(module.eval(), inputs)
    with torch.no_grad():
        gm.get_parameter("layers.0.self_attn.out_proj.weight").mul_(-1.0)  # "fine-tuned"
        gm.get_parameter("layers.0.self_attn.r_proj.weight").normal_()
    pc.save(gm, tmp_path / "ft")
    report = pc.verify(tmp_path / "ft")
    assert report.ok and report.notes and "full fine-tuning" in report.notes[0]
    assert all(e["error"] <= e["tolerance"] for e in report.op_errors) and len(report.op_errors) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "no_such_model"], "Error:"),
        (["inspect", "no.such.module:factory"], "Error:"),
        (["convert"], "Missing option"),
        (["verify", "/nonexistent/dir"], "does not exist"),
    ],
    ids=["unknown-model", "bad-factory", "missing-output", "missing-dir"],
)
def test_user_mistakes_are_one_line(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("spec", ["tiny-bloom", "tiny-t5"])
def test_convert_takes_the_graph_path_when_in_place_upgrade_cannot(tmp_path, spec):
    """Bloom (attention not through AttentionInterface) and T5 (encoder-decoder) are converted
    through the captured graph and saved as model.pt2, which verify accepts."""
    out = tmp_path / spec
    result = CliRunner().invoke(main, ["convert", spec, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.pt2").is_file() and not (out / "config.json").exists()
    assert _run("verify", str(out)).exit_code == 0


def test_convert_upgrades_gpt2_in_place(tmp_path):
    """GPT-2's fused c_attn is upgraded in place now: a Hugging Face directory, not model.pt2."""
    out = tmp_path / "gpt2"
    result = CliRunner().invoke(main, ["convert", "tiny-gpt2", "-o", str(out), "--seq-len", "10"])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and not (out / "model.pt2").exists()


def test_convert_hf_causal_lm_refuses_graph_only_options(tmp_path):
    result = CliRunner().invoke(main, ["convert", "tiny-llama", "-o", str(tmp_path / "x"), "--probe", "gated"])
    assert result.exit_code != 0 and "--probe gated" in result.output
