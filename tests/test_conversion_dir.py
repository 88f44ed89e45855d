"""One conversion directory, one loader (issue 15): the manifest, safe output, weight digests,
converted Hugging Face models as standard transformers models (Auto classes, trust_remote_code,
Trainer, PEFT, pipeline), and dynamic shapes from the CLI as from the Python API."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import parallax_compile as pc
from parallax_compile.conversion_dir import OutputNotAllowed, read_manifest

try:
    from graph_tools import switch_on_probes
except ImportError:  # imported by the CLI as `tests.<module>:factory` (the repo root on sys.path)
    from tests.graph_tools import switch_on_probes

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def factory():
    """``tests.test_conversion_dir:factory``: a 2-layer encoder (nn.MultiheadAttention), no ``dynamic_dims``."""
    torch.manual_seed(0)  # the same weights in every process (the CLI runs it in a subprocess)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), {"src": torch.randn(2, 5, 32)}


def _cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "parallax_compile.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()


def _probe_params(model):
    return {n: p for n, p in model.named_parameters() if pc.saving.is_probe(n)}


@pytest.fixture()
def upgraded():
    """A tiny Llama upgraded in place (random probes), and its example inputs."""
    from parallax_compile import hf

    model = _tiny_llama()
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    hf.upgrade(model, inputs)
    switch_on_probes(model)
    return model, inputs


# ----------------------------------------------------------------- Hugging Face: standard calls


def test_upgraded_model_is_a_standard_transformers_model(upgraded, tmp_path):
    """save_pretrained writes everything; AutoModelForCausalLM.from_pretrained returns the Parallax class
    with the trained probes; config.json names model_type "parallax" (the base model type would load
    a plain model dropping the probes); pc.load and verify read the same directory."""
    model, inputs = upgraded
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "parallax" and cfg["architectures"] == ["ParallaxLlamaForCausalLM"]
    assert cfg["parallax_base_architecture"] == "LlamaForCausalLM"
    shape = list(model.model.layers[0].self_attn.q_proj.weight.shape)  # W_R is shaped like the q rows of W_Q
    assert cfg["parallax_probes"] == {"model.layers.0.self_attn": shape, "model.layers.1.self_attn": shape}
    assert read_manifest(tmp_path)["kind"] == "huggingface"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back).__name__ == "ParallaxLlamaForCausalLM" and isinstance(back, transformers.LlamaForCausalLM)
    for name, p in _probe_params(model).items():
        assert torch.equal(back.get_parameter(name), p), name
    ids = torch.randint(1, 96, (3, 11))  # another batch size and length
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    assert type(pc.load(tmp_path)).__name__ == "ParallaxLlamaForCausalLM"
    report = pc.verify(tmp_path)
    assert report.ok, report.problems
    assert len(report.probe_norms) >= 2 and all(v > 0 for v in report.probe_norms.values())


def test_directory_with_the_older_probe_names_loads(upgraded, tmp_path):
    """A directory written before the probe shapes were recorded (``parallax_probes = {owner:
    "q_proj"}``, the probe appended to q_proj's output) loads with the same probes and logits: the
    owner's pre-hook replays the same chain; the loaded config records the shapes."""
    model, _ = upgraded
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["parallax_probes"] = {o: "q_proj" for o in cfg["parallax_probes"]}
    cfg_path.write_text(json.dumps(cfg))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert back.config.parallax_probes == {o: list(model.get_submodule(o).r_proj.weight.shape)
                                           for o in cfg["parallax_probes"]}
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_without_the_package_loading_fails_loudly(upgraded, tmp_path):
    """Plain transformers (parallax_compile not importable) refuses the directory instead of loading a
    Llama without its probes; with trust_remote_code=True and the package, the auto_map loads it."""
    model, _ = upgraded
    model.save_pretrained(tmp_path)
    block = "import sys; sys.modules['parallax_compile'] = None; "  # import parallax_compile -> ImportError
    load = f"import transformers; m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    for code, expect in [(block + load + ")", "custom code"),
                         (block + load + ", trust_remote_code=True)", "parallax_compile")]:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode != 0 and expect in proc.stderr, proc.stderr[-2000:]
    code = (load + ", trust_remote_code=True); import sys; "
            "print(type(m).__name__, 'parallax_compile' in sys.modules, "
            "sum('r_proj' in n for n, _ in m.named_parameters()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["ParallaxLlamaForCausalLM", "True", "2"]


def test_trainer_fine_tune_save_verify(upgraded, tmp_path):
    """transformers.Trainer trains every weight; save_model records the training in the manifest, so
    verify passes (W_R = 0 check skipped, with a note) and the trained probes come back."""
    model, inputs = upgraded
    ids = torch.randint(1, 96, (8, 12), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in _probe_params(model).items()}
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(before[n], p) for n, p in _probe_params(model).items())
    model.eval()
    pc.save(model, tmp_path / "ft")
    manifest = read_manifest(tmp_path / "ft")
    assert any(n.endswith("q_proj.weight") for n in manifest["trained"])
    report = pc.verify(tmp_path / "ft")
    assert report.ok and "fine-tuning" in report.notes[0], report.problems
    back = pc.load(tmp_path / "ft")
    for name, p in _probe_params(model).items():
        assert torch.equal(back.get_parameter(name), p), name


def test_peft_lora_on_probes_and_projections(upgraded, tmp_path):
    """LoRA on q_proj / v_proj and on the probe r_proj (the hook calls the module, so LoRA takes part),
    the probe gain trained in full; merged and saved, the directory verifies and reloads equal."""
    peft = pytest.importorskip("peft")
    model, inputs = upgraded
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "r_proj"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, cfg)
    assert any("r_proj.lora_A" in n for n, _ in wrapped.named_parameters())
    for n, p in wrapped.named_parameters():
        if "r_gain" in n:
            p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    ids = inputs["input_ids"]
    wrapped.train()
    for _ in range(3):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    lora_b = [p for n, p in wrapped.named_parameters() if "r_proj.lora_B" in n]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)  # the probe's LoRA learned
    merged = wrapped.merge_and_unload().eval()
    assert type(merged).__name__ == "ParallaxLlamaForCausalLM"
    pc.save(merged, tmp_path / "lora")
    assert pc.verify(tmp_path / "lora").ok
    back = pc.load(tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, back(ids).logits, atol=1e-6)


def test_text_generation_pipeline(upgraded, tmp_path):
    model, _ = upgraded
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(96)} | {"[UNK]": 0}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    gen = transformers.pipeline("text-generation", model=str(tmp_path), tokenizer=tokenizer)
    assert type(gen.model).__name__ == "ParallaxLlamaForCausalLM"
    out = gen("w5 w7 w9", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("w5 w7 w9")


def test_verify_detects_a_one_percent_edit_unless_training_is_recorded(upgraded, tmp_path):
    model, _ = upgraded
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pc.save(model, tmp_path / "edited")  # eval mode, no trained=True: not recorded
    assert any("training was not recorded" in str(w.message) for w in caught)
    report = pc.verify(tmp_path / "edited")
    assert not report.ok and any("mlp.down_proj.weight" in p for p in report.problems), report.problems
    pc.save(model, tmp_path / "recorded", trained=True)
    assert pc.verify(tmp_path / "recorded").ok


def test_verify_detects_a_weight_edited_on_disk(tmp_path):
    from safetensors.torch import load_file, save_file

    module, inputs = factory()
    pc.save(pc.convert(module.eval(), inputs), tmp_path / "g")
    assert pc.verify(tmp_path / "g").ok
    # Graph kind: the weights live in model.pt2; edit one through load + save without trained=True.
    gm = pc.load(tmp_path / "g")
    with torch.no_grad():
        gm.get_parameter("layers.1.linear2.weight").mul_(1.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pc.save(gm, tmp_path / "g")
    report = pc.verify(tmp_path / "g")
    assert not report.ok and "layers.1.linear2.weight" in report.problems[0]
    # Hugging Face kind: edit model.safetensors directly.
    from parallax_compile import hf

    model = _tiny_llama()
    ids = torch.randint(1, 96, (2, 8))
    hf.upgrade(model, {"input_ids": ids})
    pc.save(model, tmp_path / "h")
    weights = load_file(tmp_path / "h" / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] *= 1.01
    save_file(weights, tmp_path / "h" / "model.safetensors", metadata={"format": "pt"})
    report = pc.verify(tmp_path / "h")
    assert not report.ok and "up_proj.weight" in report.problems[0]


# ----------------------------------------------------------------- graph kind: load, train, save


def test_loaded_graph_model_trains_and_saves(tmp_path):
    """pc.save takes a model from pc.load that was trained (it raised "not a converted model")."""
    module, inputs = factory()
    pc.save(pc.convert(module.eval(), inputs), tmp_path / "a")
    gm = pc.load(tmp_path / "a")
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    x = torch.randn(3, 7, 32)  # another batch size and length
    gm(src=x).square().mean().backward()
    opt.step()
    pc.save(gm, tmp_path / "b", trained=True)
    report = pc.verify(tmp_path / "b")
    assert report.ok, report.problems
    back = pc.load(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(back(src=x), gm(src=x))


def test_interrupted_save_leaves_the_old_directory(tmp_path, monkeypatch):
    module, inputs = factory()
    gm = pc.convert(module.eval(), inputs)
    pc.save(gm, tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pc.saving, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        pc.save(gm, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no partial sibling left behind
    with pytest.raises(KeyboardInterrupt):
        pc.save(gm, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_save_refuses_a_foreign_directory(tmp_path):
    module, inputs = factory()
    gm = pc.convert(module.eval(), inputs)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "parallax.json").write_text('{"my": "own file"}')
    with pytest.raises(OutputNotAllowed, match="not a conversion directory"):
        pc.save(gm, tmp_path / "mine")
    assert (tmp_path / "mine" / "parallax.json").read_text() == '{"my": "own file"}'
    pc.save(gm, tmp_path / "mine", overwrite=True)
    assert read_manifest(tmp_path / "mine")["kind"] == "graph"


# ----------------------------------------------------------------- the CLI (subprocess)


def test_cli_convert_output_safety(tmp_path):
    """convert -o: refuses a non-empty directory that is not an earlier conversion of the same model
    (before converting), replaces an earlier one of the same model, never keeps stale files, and
    checks that -o is writable first."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # e.g. another model's tokenizer
    proc = _cli("convert", "tests.test_conversion_dir:factory", "-o", out)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr + proc.stdout
    assert "attention site(s) found" not in proc.stdout  # refused before converting
    proc = _cli("convert", "tests.test_conversion_dir:factory", "-o", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "tokenizer.json").exists()  # stale file gone
    proc = _cli("convert", "tests.test_conversion_dir:factory", "-o", out)  # same model again: allowed
    assert proc.returncode == 0, proc.stderr
    proc = _cli("convert", "nanogpt", "--seq-len", "16", "-o", out)  # another model
    assert proc.returncode == 1 and "another conversion" in proc.stderr + proc.stdout
    blocker = tmp_path / "a-file"  # -o under a file: cannot be created (chmod would not stop root)
    blocker.write_text("")
    proc = _cli("convert", "tests.test_conversion_dir:factory", "-o", blocker / "sub")
    assert proc.returncode == 1 and "not a writable directory" in proc.stderr + proc.stdout
    assert "attention site(s) found" not in proc.stdout


def test_cli_factory_shapes_are_dynamic_like_the_python_api(tmp_path):
    """A package.module:factory model converted by the CLI runs at another batch size and length,
    and convert / verify say the same thing about its shapes."""
    out = tmp_path / "f"
    proc = _cli("convert", "tests.test_conversion_dir:factory", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "dynamic batch/sequence" in proc.stdout
    proc = _cli("verify", out)
    assert proc.returncode == 0 and "shapes: dynamic batch/sequence (src dims 0/1)" in proc.stdout, proc.stdout
    gm = pc.load(out)
    module, _ = factory()
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        assert torch.allclose(gm(src=x), module.eval()(x), atol=1e-5)


def test_cli_hf_conversion_is_dynamic_and_verifies(tmp_path):
    src = tmp_path / "src"
    _tiny_llama().save_pretrained(src)
    out = tmp_path / "out"
    proc = _cli("convert", src, "-o", out, "--seq-len", "8")
    assert proc.returncode == 0, proc.stderr
    assert "dynamic batch/sequence" in proc.stdout and "static shapes" not in proc.stdout
    proc = _cli("verify", out)
    assert proc.returncode == 0 and "dynamic batch/sequence" in proc.stdout, proc.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert model(torch.randint(1, 96, (3, 13))).logits.shape == (3, 13, 96)
