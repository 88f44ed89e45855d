"""Converted models under PyTorch's distributed engines on the CPU (:mod:`parallax_compile.distributed`,
``examples/train_distributed.py``): 2 processes with the gloo backend, spawned by the test, against
the single-process run with the same data and seed.

One spawn runs every strategy in turn (the imports dominate the time): FSDP2 (with activation
checkpointing), FSDP2 + ``torch.compile`` (``aot_eager``: Inductor would compile C++ for minutes on
CI), DDP, tensor parallel (also on Qwen3, whose per-head q/k RMSNorm weights are replicated with
gradients summed over the mesh), DCP resume under FSDP2 and TP, and a TP run resumed from the
FSDP2 checkpoint. gloo has every collective these need (FSDP2's reduce-scatter and all-gather, DTensor's
all-reduce); NCCL-only features (bf16 reduce on GPU, ``torch.cuda`` streams) are the H200 run's.

The model: tiny random Llama upgraded by ``hf.upgrade`` (2 layers, hidden 64, 4 query heads, 2 KV
heads, head_dim 16), probes set to random values so every probe gradient is non-zero, all weights
trained (AdamW). Tolerances: losses and probe gradients within 1e-5 relative of the
single-process run (fp32; they differ only in the order of the gradient sums, ~1e-7 observed).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import parallax_compile as pc  # noqa: E402
from parallax_compile import distributed as pd  # noqa: E402
from parallax_compile import hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS, CUT = 6, 3
RTOL = 1e-5
COMMON = ["--batch-size", "4", "--seq-len", "24", "--train", "all", "--lr", "3e-3", "--probe-lr", "1e-2",
          "--seed", "3", "--warmup", "0"]


def _example():
    import importlib.util

    if "train_distributed" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_distributed", ROOT / "examples" / "train_distributed.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["train_distributed"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["train_distributed"]


def _runs(bases: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """name -> argv of each distributed run (in order: resumes read earlier runs' checkpoints)."""
    def run(name, strategy, steps, *extra, family="llama"):
        return name, ["--model", str(bases[family]), "--strategy", strategy, "--steps", str(steps), *COMMON,
                      "--json", str(out / f"{name}.json"), "--probe-grads", str(out / f"{name}_grads.pt"), *extra]

    return dict([
        run("fsdp", "fsdp", CUT, "--ckpt-dir", str(out / "fsdp"), "--activation-checkpointing"),
        run("fsdp_resume", "fsdp", STEPS, "--ckpt-dir", str(out / "fsdp"), "--resume",
            "--export", str(out / "fsdp_export")),
        run("fsdp_compile", "fsdp", CUT, "--compile", "--compile-backend", "aot_eager", "--activation-checkpointing"),
        run("ddp", "ddp", CUT),
        run("tp", "tp", CUT, "--ckpt-dir", str(out / "tp")),
        run("tp_resume", "tp", STEPS, "--ckpt-dir", str(out / "tp"), "--resume"),
        run("tp_from_fsdp", "tp", STEPS, "--resume", str(out / "fsdp" / f"step_{CUT:06d}")),
        # q_norm / k_norm: replicated, each rank's gradient covers its heads only (summed over the mesh)
        run("qwen3_tp", "tp", CUT, family="qwen3"),
    ])


def _worker(rank: int, world: int, port: int, bases: dict[str, str], out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a collective that one rank never joins fails after the timeout instead of hanging the test
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        mod = _example()
        for argv in _runs({k: Path(v) for k, v in bases.items()}, Path(out)).values():
            mod.main(argv)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upgraded(family: str, directory: Path) -> Path:
    """A tiny upgraded model of ``family`` with random probes, saved as a conversion directory."""
    from parallax_compile.models import tiny_hf_model

    loaded = tiny_hf_model(family)
    info = hf.upgrade(loaded.model, loaded.example_inputs, valid_positions=loaded.valid_positions)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in pc.named_probe_parameters(loaded.model):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else 0.1))
    return hf.save_hf(loaded.model, directory, source=f"tiny-{family}")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama (GQA 4:2, RoPE) and tiny Qwen3 (+ per-head q/k RMSNorm) conversions."""
    root = tmp_path_factory.mktemp("dist")
    return {family: _upgraded(family, root / family) for family in ("llama", "qwen3")}


def _single(base: Path, out: Path, steps: int, *extra: str) -> dict:
    res = _example().main(["--model", str(base), "--strategy", "none", "--steps", str(steps), *COMMON,
                           "--probe-grads", str(out / "grads.pt"), *extra])
    return {**res, "grads": torch.load(out / "grads.pt")}


@pytest.fixture(scope="module")
def single(bases, tmp_path_factory) -> dict[str, dict]:
    """The single-process references: Llama for STEPS steps (checkpoint at CUT, exported), Qwen3 for
    CUT steps; losses and first-step probe gradients."""
    out = tmp_path_factory.mktemp("single")
    llama = _single(bases["llama"], out / "llama", STEPS, "--ckpt-dir", str(out / "llama" / "ckpt"),
                    "--save-every", str(CUT), "--export", str(out / "llama" / "export"))
    qwen3 = _single(bases["qwen3"], out / "qwen3", CUT)
    return {"llama": {**llama, "export_dir": out / "llama" / "export"}, "qwen3": qwen3}


@pytest.fixture(scope="module")
def distributed(bases, tmp_path_factory) -> Path:
    """Every distributed run of :func:`_runs` on 2 gloo processes; their outputs' directory."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("runs")
    paths = {k: str(v) for k, v in bases.items()}
    mp.start_processes(_worker, args=(2, _free_port(), paths, str(out)), nprocs=2, start_method="spawn")
    return out


def _result(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["fsdp", "fsdp_compile", "ddp", "tp", "qwen3_tp"])
def test_first_losses_and_probe_gradients_equal_single_process(single, distributed, name):
    """First CUT losses (global batch mean) and the first step's full probe gradients of each
    strategy equal the single-process run's within RTOL."""
    ref_run = single["qwen3" if name.startswith("qwen3") else "llama"]
    res = _result(distributed, name)
    assert res["world_size"] == 2 and res["strategy"] == name.split("_")[-1 if name.startswith("qwen3") else 0]
    torch.testing.assert_close(res["losses"], ref_run["losses"][:CUT], rtol=RTOL, atol=0)
    grads = torch.load(distributed / f"{name}_grads.pt")
    assert set(grads) == set(ref_run["grads"]) and len(grads) >= 2
    for n, ref in ref_run["grads"].items():
        assert ref.abs().max() > 0, n  # the random probes make every probe gradient non-zero
        torch.testing.assert_close(grads[n], ref, rtol=RTOL, atol=RTOL * ref.abs().max().item(), msg=n)


@pytest.mark.parametrize("name", ["fsdp_resume", "tp_resume", "tp_from_fsdp"])
def test_resume_reproduces_the_next_losses(single, distributed, name):
    """Resumed from the DCP checkpoint at step CUT (model + AdamW state; tp_from_fsdp reshards the
    FSDP2 checkpoint for tensor parallel), steps CUT+1..STEPS give the single-process losses."""
    res = _result(distributed, name)
    assert res["start_step"] == CUT
    torch.testing.assert_close(res["losses"], single["llama"]["losses"][CUT:], rtol=RTOL, atol=0)


def test_exported_checkpoint_is_a_conversion_that_verifies(single, distributed):
    """The final FSDP2 checkpoint written back as a conversion directory: ``verify`` passes and its
    weights are the single-process run's after the same STEPS steps: each tensor's update from the
    base weights equals the single-process update within 1e-3 of its norm (AdamW divides by
    sqrt(v), so elements with gradients near 0 amplify the 1e-7 differences in the sums)."""
    out = distributed / "fsdp_export"
    report = hf.verify_hf(out)
    assert report.ok, report.problems
    got = hf.from_pretrained(out).state_dict()
    ref = hf.from_pretrained(single["llama"]["export_dir"]).state_dict()
    base = hf.from_pretrained(_result(distributed, "fsdp")["model_dir"]).state_dict()
    assert set(got) == set(ref) == set(base)
    for n, t in ref.items():
        update = (t - base[n]).norm()
        assert update > 0, n  # --train all: every tensor trained
        assert (got[n] - t).norm() <= 1e-3 * update, (n, (got[n] - t).norm().item(), update.item())


def test_tp_plan_shards_the_probe_like_q_proj():
    """The plan in transformers' conventions has the probe with q_proj's style; a model whose
    query projection has no column-wise entry is refused."""
    from parallax_compile.models import tiny_hf_model

    loaded = tiny_hf_model("llama")
    hf.upgrade(loaded.model, loaded.example_inputs, valid_positions=loaded.valid_positions)
    plan = pd.tp_plan(loaded.model)
    assert plan["layers.*.self_attn.q_proj"] == plan["layers.*.self_attn.r_proj"] == "colwise"
    assert plan["layers.*.self_attn.o_proj"] == "rowwise"
    if hasattr(loaded.model.model.layers[0].self_attn, "r_gain"):
        assert plan["layers.*.self_attn.r_gain"] == "colwise"
    loaded.model.config.base_model_tp_plan = {}
    with pytest.raises(ValueError, match="column-wise query projection"):
        pd.tp_plan(loaded.model)


def test_new_run_does_not_replace_another_runs_checkpoints(tmp_path, capsys):
    """A run without ``--resume`` into a ``--ckpt-dir`` that holds checkpoints, or with a non-empty
    ``--export``, is refused with one line (nothing a user trained is replaced silently);
    ``--resume`` or ``--overwrite`` proceed."""
    ex = _example()
    (tmp_path / "ckpt" / "step_000010").mkdir(parents=True)
    (tmp_path / "ckpt" / "step_000010" / ".metadata").write_bytes(b"")
    argv = ["--ckpt-dir", str(tmp_path / "ckpt")]
    with pytest.raises(SystemExit):
        ex.parse_args(argv)
    assert "already holds checkpoints (newest step_000010)" in capsys.readouterr().err
    assert ex.parse_args([*argv, "--resume"]).resume is True
    assert ex.parse_args([*argv, "--overwrite"]).overwrite
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        ex.parse_args(["--ckpt-dir", str(tmp_path / "new"), "--export", str(tmp_path / "final")])
    err = capsys.readouterr().err
    assert "--export" in err and "not empty" in err, err
