"""Find the attention in a Hugging Face model (or a built-in model) and show what the conversion does.

    python examples/inspect_hf.py path/to/hf-model-dir          # a directory with config.json
    python examples/inspect_hf.py tiny-qwen3-eager               # or any built-in spec
    python examples/inspect_hf.py minilm --json                  # the sites as JSON

Runs the whole pipeline (capture with ``torch.export``, match, rewrite, verify) on the model's
example inputs and prints one row per attention site: owning module, form, heads / KV heads,
head_dim, scale, mask, GQA, the query chain replayed for the probe, and whether it was rewritten
(with its error at ``W_R = 0``) or skipped (with the reason). Nothing is saved; use
``parallax-compile convert`` for that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich.console import Console

from parallax_compile.cli import sites_table
from parallax_compile.convert import run_conversion
from parallax_compile.models import builtin_names, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="tiny-llama-sdpa",
                   help=f"a Hugging Face model directory or a built-in spec ({', '.join(builtin_names())}; "
                        "tiny-<family> also takes -eager / -sdpa); default tiny-llama-sdpa")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example sequence")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the sites as JSON instead of a table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=200)  # no wrapping when piped
    t0 = time.perf_counter()
    loaded = load_model(args.model, seq_len=args.seq_len, batch_size=args.batch_size)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                             valid_positions=loaded.valid_positions)
    t_convert = time.perf_counter() - t0
    if args.json:
        print(json.dumps([s.as_dict() for s in info.sites], indent=2, default=str))
        return 0
    console.print(f"[bold]{args.model}[/]: {loaded.description}")
    console.print(sites_table(info.sites, f"{args.model}: attention sites"))
    n, k = len(info.sites), len(info.rewritten)
    shapes = "dynamic batch/sequence" if info.dynamic else (info.note or "static shapes")
    err = "-" if info.max_output_error is None else f"{info.max_output_error:.1e}"
    console.print(f"{n} site(s), {k} rewritten, {n - k} skipped; {shapes}; "
                  f"outputs at W_R = 0 vs original: max relative error {err}; "
                  f"load {t_load:.1f} s, conversion {t_convert:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
