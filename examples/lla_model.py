"""An LLA language model converted to Parallax, then fine-tuned: how close does it get?

1. Train the built-in LLA LM (``parallax_compile.models.lla``: attention layers written with
   ``torch.linalg.solve``, GQA, causal) on real text (Python's reference manual, byte level).
2. Convert it with ``parallax_compile.convert``: every LLA site found with its ``lambda`` and
   replaced by Parallax with a probe calibrated on text (and, for comparison, the same conversion
   with the probe at zero = softmax attention).
3. Fine-tune both converted models and the LLA model itself for the same steps and compare their
   validation loss (what the issue asks: how close the converted model gets to the LLA model).

    python examples/lla_model.py              # GPU config (a few hundred steps; < 2 min on an H200)
    python examples/lla_model.py --smoke      # tiny CPU config (about a minute)

Writes ``$OUT/lla_finetune[_smoke].json`` (default ``OUT=benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from parallax_compile.calibrate import token_batches
from parallax_compile.convert import run_conversion
from parallax_compile.models.lla import build_lla_model
from parallax_compile.models.text import get_batch, train_val_split

CONFIGS = {
    "gpu": {"model": {"n_layer": 4, "n_head": 8, "n_kv_head": 4, "head_dim": 16, "n_embd": 128, "block_size": 256},
                "batch": 32, "seq": 128, "pretrain": 500, "finetune": 300, "lr": 2e-3, "ft_lr": 5e-4, "eval_batches": 20,
                "calib_tokens": 16384},
    "smoke": {"model": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "head_dim": 8, "n_embd": 32, "block_size": 64},
                  "batch": 8, "seq": 32, "pretrain": 40, "finetune": 20, "lr": 3e-3, "ft_lr": 1e-3, "eval_batches": 4,
                  "calib_tokens": 2048},
}


def loss_of(model, x, y):
    logits = model(idx=x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@torch.no_grad()
def evaluate(model, batches) -> float:
    return sum(loss_of(model, x, y).item() for x, y in batches) / len(batches)


def train(model, params, data, cfg, steps, lr, device, seed, log, name, val=None):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = get_batch(data, cfg["batch"], cfg["seq"], gen)
        loss = loss_of(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            entry = {"run": name, "step": step, "train_loss": loss.item()}
            if val is not None and step == steps - 1:
                entry["val_loss"] = evaluate(model, val)
            log.append(entry)
            print(json.dumps(entry))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU configuration")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    cfg = CONFIGS["smoke" if args.smoke else "gpu"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    out_dir = Path(os.environ.get("OUT", "benchmarks/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train_ids, val_ids = train_val_split(0.1)
    gval = torch.Generator().manual_seed(123)
    val = [tuple(t.to(device) for t in get_batch(val_ids, cfg["batch"], cfg["seq"], gval))
           for _ in range(cfg["eval_batches"])]
    log: list[dict] = []
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "config": cfg, "log": log}

    # 1. The LLA model, trained on real text.
    lla = build_lla_model("solve", **cfg["model"]).to(device).train()
    result["pretrain_s"] = train(lla, list(lla.parameters()), train_ids, cfg, cfg["pretrain"], cfg["lr"], device, 0,
                                 log, "lla-pretrain")
    lla.eval()
    result["lla_val_loss"] = evaluate(lla, val)

    # 2. Convert (a copy: the converted module shares parameters with the model it came from).
    example = {"idx": val[0][0][:4]}
    calib = token_batches(example, train_ids[: cfg["calib_tokens"] + 1].to(device), cfg["calib_tokens"] // example["idx"].numel())
    t0 = time.perf_counter()
    converted, info = run_conversion(copy.deepcopy(lla), example, calibration=calib)
    result["convert_s"] = time.perf_counter() - t0
    result["sites"] = [s.as_dict() for s in info.sites]
    result["lla_output_error"] = {"calibrated": info.lla_output_error, "zero": info.lla_output_error_zero}
    # The same conversion with W_R = 0 (softmax attention at every LLA site), for comparison.
    zero, _ = run_conversion(copy.deepcopy(lla), example, probe_init="zero", calibration=calib[:2])
    result["val_loss_at_conversion"] = {"calibrated": evaluate(converted, val), "zero": evaluate(zero, val)}
    print(json.dumps({"lla_val_loss": result["lla_val_loss"], **result["val_loss_at_conversion"]}))

    # 3. Fine-tune all three for the same steps, same batches.
    final = {}
    for name, model in (("lla", lla), ("parallax-calibrated", converted), ("parallax-zero", zero)):
        model.train()
        secs = train(model, list(model.parameters()), train_ids, cfg, cfg["finetune"], cfg["ft_lr"], device, 1, log,
                     f"finetune-{name}", val=val)
        model.eval()
        final[name] = {"val_loss": evaluate(model, val), "seconds": secs, "ms_per_step": 1e3 * secs / cfg["finetune"]}
    result["after_finetune"] = final
    result["gap_to_lla"] = {k: final[k]["val_loss"] - final["lla"]["val_loss"] for k in final if k != "lla"}
    path = out_dir / f"lla_finetune{'_smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({"after_finetune": final, "gap_to_lla": result["gap_to_lla"]}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
