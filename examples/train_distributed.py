"""Fine-tune a converted model on several processes with PyTorch's own engines (FSDP2, DDP, tensor
parallel), with Distributed Checkpoint saves and resume.

    torchrun --nproc_per_node 2 examples/train_distributed.py --model tiny-llama --strategy fsdp --steps 20
    torchrun --nproc_per_node 8 examples/train_distributed.py --model converted/gemma3 --strategy fsdp \\
        --ckpt-dir runs/g3 --save-every 100 --export runs/g3/final      # then: parallax-compile verify runs/g3/final
    torchrun ... --resume                                              # continue from the newest checkpoint
    torchrun ... --strategy tp --resume runs/g3/step_000100            # or from one (any strategy / world size)
    python examples/train_distributed.py --strategy none ...           # the plain one-process loop

``--model`` is a conversion directory (``parallax-compile convert MODEL -o DIR`` of a Hugging Face
causal LM) or a built-in name (``tiny-llama``, ``gemma3-270m``...) that rank 0 upgrades and saves
to ``CKPT_DIR/base`` first. Strategies (:mod:`parallax_compile.distributed`):

* ``fsdp``: FSDP2 ``fully_shard`` per decoder layer and on the root, bf16 ``MixedPrecisionPolicy``
  on CUDA; each rank takes ``batch_size / world`` rows of the global batch.
* ``ddp``: ``DistributedDataParallel``, same data split, bf16 autocast on CUDA.
* ``tp``: tensor parallel over all ranks (q/k/v/r column-wise, o row-wise, gain ``Shard(0)``), every
  rank runs the whole batch on its heads.
* ``none``: no process group, the plain loop (the reference the others are tested against).

Batches are windows of the text drawn from a generator seeded by ``(seed, step)``, so a resumed run
sees the same batches as an uninterrupted one. AdamW with two parameter groups: the probes
(``r_proj``, ``r_gain``) at ``--probe-lr`` and, with ``--train all``, every other weight at ``--lr``.
Each rank logs its loss and tokens/s; rank 0 writes ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

import parallax_compile as pc
from parallax_compile import distributed as pd
from parallax_compile import hf
from parallax_compile.models import text

STRATEGIES = ("fsdp", "ddp", "tp", "none")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama", help="conversion directory or built-in name (default tiny-llama)")
    p.add_argument("--strategy", choices=STRATEGIES, default="fsdp")
    p.add_argument("--text", type=Path, help="UTF-8 text file to train on (default: the prose of pydoc_data)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps in total (a resumed run stops there too)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (rows), split over data-parallel ranks")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train", choices=("probes", "all"), default="all", help="train the probes only, or everything")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW lr of the converted model's own weights")
    p.add_argument("--probe-lr", type=float, default=1e-3, help="AdamW lr of the probes (r_proj, r_gain)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 compute (default: on CUDA); FSDP: MixedPrecisionPolicy, others: autocast")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--ckpt-dir", type=Path, help="DCP checkpoints go to CKPT_DIR/step_NNNNNN")
    p.add_argument("--save-every", type=int, default=0, help="save every N steps (0: at the end only)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="start from CHECKPOINT (a step_NNNNNN directory, written under any strategy and world "
                        "size) or, without a value, from the newest one in --ckpt-dir")
    p.add_argument("--export", type=Path, help="write the final checkpoint as a conversion directory here")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run (no --resume) over the checkpoints of --ckpt-dir and a non-empty --export")
    p.add_argument("--json", type=Path, help="rank 0 writes the run's figures here")
    p.add_argument("--probe-grads", type=Path, help="rank 0 saves the first step's full probe gradients here")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the tokens/s figure")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2:
        p.error("--steps, --batch-size must be >= 1 and --seq-len >= 2")
    if (args.resume is True or args.save_every or args.export) and args.ckpt_dir is None:
        p.error("--resume (without a checkpoint), --save-every and --export need --ckpt-dir")
    if not args.resume and not args.overwrite:  # a new run must not replace another run's work
        old = latest_checkpoint(args.ckpt_dir) if args.ckpt_dir and args.ckpt_dir.is_dir() else None
        if old is not None:
            p.error(f"--ckpt-dir {args.ckpt_dir} already holds checkpoints (newest {old.name}): pass --resume to "
                    "continue that run, --overwrite to start over, or another --ckpt-dir")
        if args.export and args.export.is_dir() and any(args.export.iterdir()):
            p.error(f"--export {args.export} is not empty: pass --overwrite to replace it, or another directory")
    return args


def prepare_model(args, rank: int) -> Path:
    """The conversion directory to load: ``--model`` itself, or ``CKPT_DIR/base`` that rank 0 writes
    by upgrading the built-in model ``--model``."""
    if hf.is_hf_dir(args.model):
        return Path(args.model)
    base = (args.ckpt_dir or Path("runs") / "train_distributed") / "base"
    if rank == 0 and not hf.is_hf_dir(base):
        from parallax_compile.models import load_model

        loaded = load_model(args.model)
        info = hf.upgrade(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                          valid_positions=loaded.valid_positions)
        tokenizer_dir = None
        if args.model.startswith("gemma3-270m"):
            from parallax_compile.models.gemma3 import gemma3_270m_dir

            tokenizer_dir = gemma3_270m_dir()
        hf.save_hf(loaded.model, base, source=args.model, tokenizer_dir=tokenizer_dir)
        print(f"# upgraded {args.model} ({len(info.sites)} sites) and saved it to {base}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return base


def token_ids(args, model_dir: Path, vocab_size: int) -> Tensor:
    """The text as token ids ``[N]`` (int64): the model directory's tokenizer, or UTF-8 bytes modulo
    the vocabulary when it has none (tiny random models)."""
    corpus = args.text.read_text(encoding="utf-8") if args.text else text.corpus()
    if (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file():
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        return torch.tensor(tok(corpus, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return torch.frombuffer(bytearray(corpus.encode("utf-8")), dtype=torch.uint8).long() % vocab_size


def batch(data: Tensor, args, step: int) -> tuple[Tensor, Tensor]:
    """The global batch of ``step``: ``(x, y)`` int64 ``[batch_size, seq_len]``, a function of
    ``(seed, step)`` only."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return text.get_batch(data, args.batch_size, args.seq_len, gen)


def build(args, model_dir: Path, device: torch.device, world: int):
    """``(model to call, unwrapped model, optimizer)`` for ``args.strategy``."""
    torch.manual_seed(args.seed)
    model = hf.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    for n, p in model.named_parameters():
        p.requires_grad_(args.train == "all" or pc.is_probe(n))
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"
    if args.activation_checkpointing:
        pd.apply_activation_checkpointing(model)
    if args.strategy == "tp":
        from torch.distributed.device_mesh import init_device_mesh

        pd.apply_tp(model, init_device_mesh(device.type, (world,)))
    if args.compile:
        pd.compile_layers(model, backend=args.compile_backend)
    if args.strategy == "fsdp":
        pd.apply_fsdp(model, param_dtype=torch.bfloat16 if bf16 else None)
    probes = [p for n, p in model.named_parameters() if p.requires_grad and pc.is_probe(n)]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not pc.is_probe(n)]
    groups = [{"params": g, "lr": lr, "name": name}
              for name, g, lr in (("probes", probes, args.probe_lr), ("others", others, args.lr)) if g]
    if not groups:
        raise ValueError(f"{model_dir}: nothing to train (--train {args.train}; no probes?)")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    wrapped = pd.apply_ddp(model, device) if args.strategy == "ddp" else model
    return wrapped, model, optimizer


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(p for p in ckpt_dir.glob("step_*") if (p / ".metadata").is_file())
    return found[-1] if found else None


def full_probe_grads(model) -> dict[str, Tensor]:
    """Every probe's gradient as a full tensor (gathered from the shards: collective)."""
    out = {}
    for n, p in pc.named_probe_parameters(model):
        g = p.grad
        if g is not None:
            out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().float().cpu()
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    own_group = False
    if args.strategy == "none":
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        own_group = not dist.is_initialized()
        rank, world, device = pd.init()
    try:
        return _train(args, rank, world, device)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(args, rank: int, world: int, device: torch.device) -> dict:
    dp = args.strategy in ("fsdp", "ddp")
    if dp and args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not divide over {world} data-parallel ranks")
    model_dir = prepare_model(args, rank)
    wrapped, model, optimizer = build(args, model_dir, device, world)
    data = token_ids(args, model_dir, model.config.vocab_size)
    start = 0
    if args.resume:
        ckpt = latest_checkpoint(args.ckpt_dir) if args.resume is True else Path(args.resume)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {args.ckpt_dir}")
        start = pd.load_checkpoint(ckpt, model, optimizer)
        if rank == 0:
            print(f"# resumed from {ckpt} (step {start})", flush=True)
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and args.strategy != "fsdp"
                else contextlib.nullcontext())
    rows = args.batch_size // world if dp else args.batch_size
    losses, times, saved, grads = [], [], [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(start, args.steps):
        x, y = batch(data, args, step)
        if dp:
            x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        x, y = x.to(device), y.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            logits = wrapped(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if grads is None and args.probe_grads is not None:
            grads = full_probe_grads(model)
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        value = loss.detach().float()
        if dp:  # the global batch's mean loss (equal tokens per rank)
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"rank {rank}: loss {losses[-1]} at step {step}")
        # one write per line: the ranks share torchrun's stdout
        print(f"rank {rank} step {step + 1} loss {losses[-1]:.6f} tok/s {x.numel() / times[-1]:,.0f}\n",
              end="", flush=True)
        done = step + 1
        if args.ckpt_dir and ((args.save_every and done % args.save_every == 0) or done == args.steps):
            path = args.ckpt_dir / f"step_{done:06d}"
            pd.save_checkpoint(path, model, optimizer, step=done)
            saved.append(str(path))
    timed = times[args.warmup:] or times
    tokens_per_s = rows * args.seq_len / statistics.median(timed) if timed else float("nan")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    per_rank = [(tokens_per_s, peak)]
    if dist.is_initialized():
        per_rank = [None] * world
        dist.all_gather_object(per_rank, (tokens_per_s, peak))
    result = {
        "model": args.model, "model_dir": str(model_dir), "strategy": args.strategy, "world_size": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "bf16": bool(args.bf16 if args.bf16 is not None else device.type == "cuda"),
        "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
        "train": args.train, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "start_step": start, "steps": args.steps, "losses": losses,
        "median_step_s": statistics.median(timed) if timed else None,
        "tokens_per_s_per_rank": [r[0] for r in per_rank], "tokens_per_s": sum(r[0] for r in per_rank) if dp
        else per_rank[0][0], "peak_memory_bytes_per_rank": [r[1] for r in per_rank], "checkpoints": saved,
    }
    if args.export and saved:
        if rank == 0:
            pd.checkpoint_to_conversion(saved[-1], model_dir, args.export, overwrite=True)
            result["export"] = str(args.export)
            print(f"# wrote {args.export}; check it with: parallax-compile verify {args.export}", flush=True)
        if dist.is_initialized():
            dist.barrier()
    if rank == 0:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
        if grads is not None:
            args.probe_grads.parent.mkdir(parents=True, exist_ok=True)
            torch.save(grads, args.probe_grads)
        print(f"# {args.strategy} x{world}: {result['tokens_per_s']:,.0f} tokens/s, losses "
              f"{losses[0] if losses else float('nan'):.4f} -> {losses[-1] if losses else float('nan'):.4f}", flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
