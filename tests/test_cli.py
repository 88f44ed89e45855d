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
    sites = json.loads(result.stdout)  # progress lines go to stderr
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
    pc.save(gm, tmp_path / "ft", trained=True)  # training recorded: the W_R = 0 comparison does not apply
    report = pc.verify(tmp_path / "ft")
    assert report.ok and report.notes and "fine-tuning" in report.notes[0]
    assert all(e["error"] <= e["tolerance"] for e in report.op_errors) and len(report.op_errors) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "no_such_model"], "Error:"),
        (["inspect", "no.such.module:factory"], "Error:"),
        (["convert"], "Missing option"),
        (["verify", "/nonexistent/dir"], "does not exist"),
        (["export", "onnx", "tiny-llama", "out/model.onnx"], "export onnx tiny-llama out/model/"),
        (["export", "onnx", "tiny-llama", "-o", "x.onnx"], "writes a directory, as optimum-cli does"),
    ],
    ids=["unknown-model", "bad-factory", "missing-output", "missing-dir", "onnx-file-as-dir", "onnx-dash-o"],
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


# --- a quiet, informative command line (issue 15) -----------------------------------------------


def _cli(*args, timeout=600):
    """The installed entry point in a fresh process, output piped (not a terminal)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "parallax_compile.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_missing_path_says_no_such_directory():
    proc = _cli("inspect", "/nonexistent/model_dir")
    assert proc.returncode == 1
    assert "no such directory: /nonexistent/model_dir" in proc.stderr
    assert "unknown model spec" not in proc.stderr and len(proc.stderr) < 200 and "Traceback" not in proc.stderr


def test_truncated_program_is_one_line(tmp_path):
    out = tmp_path / "m"
    assert _run("convert", "tests.test_cli:factory", "-o", str(out)).exit_code == 0
    data = (out / "model.pt2").read_bytes()
    (out / "model.pt2").write_bytes(data[: len(data) // 3])
    proc = _cli("verify", str(out))
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("Error:") and "Traceback" not in proc.stderr
    assert len([ln for ln in lines if not ln.startswith(("Verifying", "  done"))]) == 1, proc.stderr


@pytest.mark.parametrize("command", [["inspect"], ["convert"], ["export", "onnx"], ["export", "mlir"], []],
                         ids=["inspect", "convert", "export-onnx", "export-mlir", "main"])
def test_help_says_what_model_can_be(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    for part in ("MODEL can be", "nanogpt", "config.json", "parallax-compile convert", "package.module:function"):
        assert part in result.output, part


def test_json_on_every_command(tmp_path):
    """Every command takes --json: stdout is then exactly one JSON document."""
    out = tmp_path / "m"
    result = CliRunner().invoke(main, ["convert", "tests.test_cli:factory", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    converted = json.loads(result.stdout)
    assert converted["output"] == str(out) and converted["rewritten"] == 2
    result = CliRunner().invoke(main, ["verify", str(out), "--json"])
    assert result.exit_code == 0, result.output
    verified = json.loads(result.stdout)
    assert verified["ok"] and len(verified["op_errors"]) == 2
    assert json.loads(CliRunner().invoke(main, ["models", "--json"]).stdout)[0] == "nanogpt"
    for command in (["inspect"], ["export", "onnx"], ["export", "mlir"]):
        assert "--json" in CliRunner().invoke(main, [*command, "--help"]).output


def test_export_onnx_piped_is_quiet_and_says_what_it_does(tmp_path):
    """``export onnx`` of a graph conversion in a fresh process with piped output: progress lines on
    stderr, no third-party warnings (torchvision, LeafSpec FutureWarning, torch.onnx's progress),
    the JSON report on stdout, Optimum's names in the directory."""
    out = tmp_path / "onnx"
    proc = _cli("export", "onnx", "tiny-bert", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    for noise in ("torchvision", "Warning", "[torch.onnx]", "LeafSpec", "W1"):
        assert noise not in proc.stderr, f"{noise!r} in stderr:\n{proc.stderr}"
    assert "Loading tiny-bert ..." in proc.stderr and "Exporting to" in proc.stderr
    assert "done in" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["error"] <= report["tolerance"] == 1e-4
    assert report["inputs"][:2] == ["input_ids", "attention_mask"] and report["outputs"][0] == "last_hidden_state"
    assert report["dims"]["input_ids"] == ["batch_size", "sequence_length"]
    assert report["dims"]["last_hidden_state"][:2] == ["batch_size", "sequence_length"]
    assert (out / "model.onnx").is_file() and (out / "config.json").is_file()


def test_export_onnx_fails_beyond_the_tolerance(tmp_path, monkeypatch):
    from parallax_compile.export import onnx_dir

    monkeypatch.setitem(onnx_dir.ORT_TOLERANCE, "float32", -1.0)  # no error can pass
    result = CliRunner().invoke(main, ["export", "onnx", "tests.test_cli:factory", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "does not match PyTorch" in result.output and "tolerance" in result.output
    assert "src [batch_size, sequence_length, 32]" in result.output  # dims shown, not eaten as rich markup


@pytest.mark.slow
def test_export_onnx_decoder_with_kv_cache_from_the_cli(tmp_path):
    """The README's path for a Hugging Face decoder: ``export onnx tiny-llama DIR`` upgrades in
    place and exports with the KV cache; greedy tokens equal PyTorch's."""
    out = tmp_path / "llama"
    proc = _cli("export", "onnx", "tiny-llama", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kv_cache"] and report["tokens_equal"] and report["generated_tokens"] == 8
    assert "past_key_values.0.key" in report["inputs"] and "present.1.value" in report["outputs"]
    assert (out / "config.json").is_file()
