"""Smoke runs of the example scripts (tiny CPU configurations of what runs on the H200)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_pretrain_compare_smoke(tmp_path):
    """Softmax and Parallax runs, Muon and AdamW: finite, learning (val loss falls from the
    untrained model's ~ln 256), Parallax models own probes, results JSON and plot written."""
    mod = _load("pretrain_compare")
    out = mod.main(["--smoke", "--data", "pydoc", "--out", str(tmp_path)])
    runs = {f"{r['attention']}:{r['optimizer']}": r for r in out["runs"]}
    assert set(runs) == {"softmax:muon", "parallax:muon", "softmax:adamw", "parallax:adamw"}
    for name, r in runs.items():
        first, last = r["curve"][0]["val_loss"], r["final_val_loss"]
        assert math.isfinite(last) and last < first - 0.1, (name, first, last)
        assert r["tokens"] == 6 * 4 * 64
    assert runs["parallax:muon"]["params"] > runs["softmax:muon"]["params"]  # the probes W_R
    saved = json.loads((tmp_path / "pretrain_compare_smoke.json").read_text())
    assert saved["summary"]["delta_muon"]["mean"] == pytest.approx(
        runs["parallax:muon"]["final_val_loss"] - runs["softmax:muon"]["final_val_loss"])
    assert (tmp_path / "pretrain_compare_smoke.png").stat().st_size > 0


def test_parallax_model_uses_the_op_and_probe_path():
    """The Parallax variant calls the op with r through q's norm and RoPE; with W_R = 0 it equals
    the softmax model with the same weights."""
    import torch

    mod = _load("pretrain_compare")
    torch.manual_seed(0)
    cfg = mod.Config(n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, d_ff=96, seq_len=33)
    soft = mod.LM(cfg)
    par = mod.LM(mod.Config(**{**cfg.__dict__, "attention": "parallax"}))
    missing = par.load_state_dict(soft.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith("r_proj.weight") for k in missing)
    idx = torch.randint(0, 256, (2, 33))
    for blk in par.blocks:
        torch.nn.init.zeros_(blk.attn.r_proj.weight)
    torch.testing.assert_close(par(idx), soft(idx), rtol=1e-5, atol=1e-5)
    for blk in par.blocks:
        torch.nn.init.normal_(blk.attn.r_proj.weight, std=0.02)
    assert (par(idx) - soft(idx)).abs().max() > 1e-3


def test_upgrade_pretrained_smoke(tmp_path):
    """Tiny Gemma 3: upgraded in place with logits unchanged at zero gain, the three arms run from
    the same starting loss; training only the probes leaves the other weights alone and moves the
    gains off zero; the summary has a mean per arm."""
    mod = _load("upgrade_pretrained")
    doc = mod.main(["--smoke", "--out", str(tmp_path)])
    assert doc["sites_rewritten"] >= 2
    assert doc["logits_change_at_zero_probe"] < 1e-5
    assert doc["continuity"]["ok"]
    runs = {r["arm"]: r for r in doc["runs"]}
    assert set(runs) == {"original-all", "parallax-all", "parallax-probes"}
    before = {r["val_loss_before"] for r in runs.values()}
    assert max(before) - min(before) < 1e-5  # zero gains: the upgraded model is the original
    for r in runs.values():
        assert math.isfinite(r["val_loss_after"])
    assert runs["parallax-probes"]["gain_abs_mean_after"] > 0
    assert runs["original-all"]["gain_abs_mean_after"] == 0
    assert runs["parallax-probes"]["trainable_params"] < runs["parallax-all"]["trainable_params"]
    assert doc["summary"]["adamw:parallax-probes"]["n"] == 1
    assert (tmp_path / "upgrade_pretrained_smoke.json").is_file()
