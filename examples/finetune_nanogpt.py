"""Fine-tune a nanoGPT-style model converted to Parallax attention, on real text, and save it.

    python examples/finetune_nanogpt.py --steps 50 --output converted/nanogpt-finetuned

1. builds the built-in ``nanogpt`` model (byte-level, hand-written attention, random weights);
2. converts it with :func:`parallax_compile.convert`: every attention becomes one
   ``parallax.attention`` node with a zero-initialised probe ``W_R`` (``...attn.r_proj.weight``),
   so the converted model starts out computing exactly what the original did;
3. trains every parameter (probes included) with AdamW on the prose of Python's reference manual
   (``pydoc_data``, always on disk), printing the loss and the probe norms every few steps;
4. reports the validation loss before and after, and saves the model with
   :func:`parallax_compile.save` (``trained=True`` unless ``--probes-only``).
   ``parallax-compile verify OUTPUT`` checks every weight against the manifest's digests, every
   Parallax node against the float64 reference and, with ``--probes-only``, the outputs at
   ``W_R = 0`` against the *original* model (after full fine-tuning it says that check does not apply).

``--from DIR`` starts from a conversion directory written by ``parallax-compile convert nanogpt -o DIR``.

CPU only, a couple of seconds per step at the defaults.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import parallax_compile as pc
from parallax_compile.checks import is_probe
from parallax_compile.models import load_model, text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--block-size", type=int, default=64, help="bytes per sequence, <= 256 (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--log-every", type=int, default=10, help="print loss and probe norms every N steps")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches for the val loss")
    p.add_argument("--probes-only", action="store_true", help="train only the probes W_R (freeze the rest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("converted/nanogpt-finetuned"),
                   help="directory to save the converted, fine-tuned model to")
    p.add_argument("--from", dest="from_dir", type=Path, default=None,
                   help="start from a conversion directory (parallax-compile convert nanogpt -o DIR) instead of "
                        "converting here")
    p.add_argument("--overwrite", action="store_true", help="replace --output even if it holds another fine-tune")
    return p.parse_args(argv)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy; the converted module is called like the original: ``idx=``."""
    logits = model(idx=x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def val_loss(model: torch.nn.Module, val: torch.Tensor, batches: int, batch_size: int, block_size: int) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same validation batches every time
    losses = [lm_loss(model, *text.get_batch(val, batch_size, block_size, gen)).item() for _ in range(batches)]
    return sum(losses) / len(losses)


def probe_norms(model: torch.nn.Module) -> dict[str, float]:
    return {n: p.detach().norm().item() for n, p in model.named_parameters() if "r_proj" in n}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    loaded = load_model("nanogpt", seq_len=args.block_size, batch_size=2)
    print(f"model: {loaded.description}")

    if args.from_dir is not None:  # a conversion directory: the same module, loaded; pc.save takes it back
        model = pc.load(args.from_dir)
        sites = model.meta["parallax_report"]["sites"]
        print(f"loaded {args.from_dir}: {sum(s['rewritable'] for s in sites)} of {len(sites)} site(s) rewritten")
        return _finetune(args, model)
    t0 = time.perf_counter()
    model = pc.convert(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims)
    info = model.meta["parallax"]
    print(f"converted in {time.perf_counter() - t0:.1f} s: {len(info.sites)} site(s), {len(info.rewritten)} rewritten, "
          f"{len(info.skipped)} skipped; outputs at W_R = 0 vs original: max relative error {info.max_output_error:.1e}")
    for s in info.sites:
        print(f"  {s.module_path:24s} {s.form:16s} heads {s.num_heads}/{s.num_kv_heads}  probe {s.probe or '-'}"
              + ("" if s.rewritable else f"  skipped: {s.reason}"))
    if not info.rewritten:
        print("no attention site could be rewritten; nothing to fine-tune")
        return 1
    return _finetune(args, model)


def _finetune(args: argparse.Namespace, model: torch.nn.Module) -> int:
    train, val = text.train_val_split(0.1)
    print(f"data: {len(train):,} training / {len(val):,} validation bytes of Python's reference manual")
    before = val_loss(model, val, args.eval_batches, args.batch_size, args.block_size)
    print(f"validation loss before: {before:.4f} (uniform over 256 bytes: {math.log(256):.4f})")

    if args.probes_only:
        for n, p in model.named_parameters():
            p.requires_grad_(is_probe(n))  # r_proj and its gain r_gain
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = text.get_batch(train, args.batch_size, args.block_size, gen)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            norms = " ".join(f"{v:.3f}" for v in probe_norms(model).values())
            print(f"step {step:4d}  loss {loss.item():.4f}  |W_R| per layer: {norms}  "
                  f"({(time.perf_counter() - t0) / step:.2f} s/step)")
    model.eval()
    after = val_loss(model, val, args.eval_batches, args.batch_size, args.block_size)
    print(f"validation loss after {args.steps} steps: {after:.4f} (before: {before:.4f})")

    # trained=True records that the non-probe weights moved (verify then skips the comparison with the
    # original model at W_R = 0, saying so); with --probes-only that comparison still applies.
    out = pc.save(model, args.output, source="nanogpt (fine-tuned by examples/finetune_nanogpt.py)",
                  trained=not args.probes_only, overwrite=args.overwrite)
    print(f"saved to {out}; check it with: parallax-compile verify {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
