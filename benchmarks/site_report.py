"""What the conversion finds and does on every model the project claims to handle.

Runs :func:`parallax_compile.convert.run_conversion` (capture with ``torch.export`` -> match ->
rewrite -> verify) on:

* ``nanogpt`` (hand-written ``masked_fill`` attention);
* all-MiniLM-L6-v2, ``minilm-eager`` and ``minilm-sdpa``;
* Gemma 3 270M, ``gemma3-270m-sdpa`` and ``gemma3-270m-eager`` (600 tokens, past its 512 window);
* every tiny Hugging Face family (gpt2, llama, qwen3, mistral, bert, t5, gemma3, gpt_neox, phi3,
  opt, falcon, bloom, gpt_neo, gemma2) x {eager, sdpa where transformers has it} x {a batch of 2
  with the last row padded, one unpadded row}; for the causal LMs that use ``AttentionInterface``
  also :func:`parallax_compile.hf.upgrade` (in place, keeps ``generate``) or its refusal;
* ``torch.nn`` modules built here: ``nn.TransformerEncoder`` (2 layers),
  ``nn.MultiheadAttention(batch_first=True)`` as self-attention (``need_weights=False``, and its
  default ``need_weights=True``: attention weights returned, skipped with the reason) and as
  cross-attention, and ``nn.TransformerDecoderLayer`` (self- and cross-attention).

and writes ``benchmarks/results/site_report.json`` (machine header + one record per model) and
``benchmarks/results/site_report.md`` (a table: sites found, rewritten, skipped with reasons, forms,
GQA, dynamic shapes, max output error at ``W_R = 0`` relative to the output's max, load and
conversion time). A model that fails to load or convert gets a row saying why; the others still
run. Times are wall-clock on this machine (the header gives the load average at the start).

Usage::

    python benchmarks/site_report.py                       # everything (Gemma: a few minutes each)
    python benchmarks/site_report.py --only nanogpt tiny-llama-sdpa mha
    python benchmarks/site_report.py --skip-gemma
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"


# --- the torch.nn models, built inline ---------------------------------------------------------------


class _Loaded:
    """The fields of :class:`parallax_compile.models.LoadedModel` that the report uses."""

    def __init__(self, model: nn.Module, inputs: dict[str, Any], description: str):
        self.model, self.example_inputs, self.description = model.eval(), inputs, description
        self.dynamic_dims: dict | None = None  # default: dims 0 and 1 of every input
        self.valid_positions = None


def _transformer_encoder() -> _Loaded:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True, dropout=0.0)
        enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        x = torch.randn(2, 7, 64)
    return _Loaded(enc, {"src": x}, "nn.TransformerEncoder: 2 x TransformerEncoderLayer(64, 4 heads, batch_first), x [2, 7, 64]")


class _Mha(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=self.need_weights)
        return out if weights is None else (out, weights)


def _cross(kind: str) -> Callable[[], _Loaded]:
    def build() -> _Loaded:
        from parallax_compile.models.torch_nn import CrossMha

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = CrossMha() if kind == "mha" else nn.TransformerDecoderLayer(
                64, 4, dim_feedforward=128, batch_first=True, dropout=0.0)
            x, memory = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
        what = "nn.MultiheadAttention(64, 4), cross-attention" if kind == "mha" else \
            "nn.TransformerDecoderLayer(64, 4 heads, batch_first)"
        inputs = {"x" if kind == "mha" else "tgt": x, "memory": memory}
        return _Loaded(m, inputs, f"{what}, x [2, 5, 64], memory [2, 7, 64]")

    return build


def _mha(need_weights: bool) -> Callable[[], _Loaded]:
    def build() -> _Loaded:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = _Mha(need_weights)
            x = torch.randn(2, 9, 64)
        return _Loaded(m, {"x": x}, f"nn.MultiheadAttention(64, 4, batch_first=True), self-attention, need_weights={need_weights}, x [2, 9, 64]")

    return build


# --- the model list --------------------------------------------------------------------------------


def _spec(name: str, **kwargs) -> Callable[[], Any]:
    def build():
        from parallax_compile.models import load_model

        return load_model(name, **kwargs)

    return build


def model_list() -> dict[str, Callable[[], Any]]:
    from parallax_compile.models import IMPLEMENTATIONS, TINY_FAMILIES

    models: dict[str, Callable[[], Any]] = {"nanogpt": _spec("nanogpt")}
    for name in ("minilm-eager", "minilm-sdpa", "gemma3-270m-sdpa", "gemma3-270m-eager"):
        models[name] = _spec(name)
    for fam in TINY_FAMILIES:
        for impl in IMPLEMENTATIONS[fam]:
            models[f"tiny-{fam}-{impl}"] = _spec(f"tiny-{fam}-{impl}")
            models[f"tiny-{fam}-{impl} (unpadded)"] = _spec(f"tiny-{fam}-{impl}", batch_size=1)
    models["nn.TransformerEncoder"] = _transformer_encoder
    models["nn.MultiheadAttention"] = _mha(need_weights=False)
    models["nn.MultiheadAttention(need_weights=True)"] = _mha(need_weights=True)
    models["nn.MultiheadAttention (cross-attention)"] = _cross("mha")
    models["nn.TransformerDecoderLayer"] = _cross("decoder")
    return models


def _upgrade(name: str, build: Callable[[], Any]) -> str:
    """``hf.upgrade`` of a tiny causal LM: ``"yes (n)"``, ``"refused: ..."``; ``"-"`` for other models."""
    import copy

    from parallax_compile import hf

    if not name.startswith("tiny-"):
        return "-"
    loaded = build()
    model = loaded.model
    if not getattr(model, "can_generate", bool)() or getattr(model.config, "is_encoder_decoder", False):
        return "-"
    try:
        info = hf.upgrade(copy.deepcopy(model), loaded.example_inputs, valid_positions=loaded.valid_positions)
    except Exception as exc:  # noqa: BLE001 - the refusal is the row
        return f"refused: {str(exc).splitlines()[0][:240]}"
    return f"yes ({len(info.rewritten)})"


# --- one model -----------------------------------------------------------------------------------


def _gqa(sites) -> str:
    kinds = sorted({f"{s.num_heads}:{s.num_kv_heads} {s.gqa}" for s in sites if s.gqa != "none"})
    return ", ".join(kinds) if kinds else "no"


def report_one(name: str, build: Callable[[], Any]) -> dict[str, Any]:
    from parallax_compile.convert import run_conversion

    record: dict[str, Any] = {"model": name}
    try:
        t0 = time.perf_counter()
        loaded = build()
        record["load_s"] = round(time.perf_counter() - t0, 2)
        record["description"] = loaded.description
        t0 = time.perf_counter()
        _, info = run_conversion(
            loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims, valid_positions=loaded.valid_positions
        )
        record["convert_s"] = round(time.perf_counter() - t0, 2)
        record["hf_upgrade"] = _upgrade(name, build)
    except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end of the report
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        record["error"] = f"{type(exc).__name__}: {first[:300]}"
        return record
    sites = info.sites
    record.update(
        sites=len(sites),
        rewritten=len(info.rewritten),
        skipped=[{"module": s.module_path, "reason": s.reason} for s in info.skipped],
        forms=sorted({s.form for s in sites}),
        gqa=_gqa(sites),
        dynamic=info.dynamic,
        capture_note=info.note,
        max_output_error=info.max_output_error,
        max_site_error=max((s.max_error for s in sites if s.max_error is not None), default=None),
        site_details=[s.as_dict() for s in sites],
    )
    return record


# --- output ----------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "parallax_compile": _version("parallax_compile"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def _fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def markdown(records: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        "# Attention sites found and rewritten, per model",
        "",
        f"Generated by `python benchmarks/site_report.py` on {machine['date']}: {machine['platform']}, "
        f"{machine['cpu_affinity']} CPU(s), torch {machine['torch']}, transformers {machine['transformers']}, "
        f"Python {machine['python']} (load average at start {machine['load_average_1m_at_start']}).",
        "",
        "Max output error: max |converted - original| / max |original| over the model's outputs at "
        "`W_R = 0` on the example inputs, non-padding positions only (fp32 tolerance 1e-5). "
        "Times are wall-clock seconds (conversion = capture + match + rewrite + verify, which runs "
        "the model about four times).",
        "",
        "| model | sites found | rewritten | skipped (reason) | forms | GQA | dynamic shapes | max output error | hf.upgrade | load (s) | conversion (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error'].replace('|', '/')} | | | | | | | | {r.get('load_s', '-')} | |")
            continue
        if r["skipped"]:
            reasons: dict[str, int] = {}
            for s in r["skipped"]:
                reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
            skipped = f"{len(r['skipped'])}: " + "; ".join(f"{why} (x{n})" if n > 1 else why for why, n in reasons.items())
        else:
            skipped = "0"
        dynamic = "yes" if r["dynamic"] else f"no ({r['capture_note']})" if r["capture_note"] else "no"
        lines.append(
            f"| {r['model']} | {r['sites']} | {r['rewritten']} | {skipped.replace('|', '/')} | {', '.join(r['forms']) or '-'} "
            f"| {r['gqa']} | {dynamic} | {_fmt_err(r['max_output_error'])} | {r.get('hf_upgrade', '-').replace('|', '/')} "
            f"| {r['load_s']:.1f} | {r['convert_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="MODEL", help="run only these models (names as in the table)")
    p.add_argument("--skip-gemma", action="store_true", help="leave out Gemma 3 270M (minutes per conversion on a CPU)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = p.parse_args(argv)

    models = model_list()
    if args.only:
        unknown = [m for m in args.only if m not in models]
        if unknown:
            p.error(f"unknown model(s) {', '.join(unknown)}; choose from: {', '.join(models)}")
        models = {k: v for k, v in models.items() if k in args.only}
    if args.skip_gemma:
        models = {k: v for k, v in models.items() if not k.startswith("gemma3-270m")}

    machine = machine_info()
    print(f"# {machine['platform']} | {machine['cpu_affinity']} CPU(s) | torch {machine['torch']} | "
          f"transformers {machine['transformers']} | Python {machine['python']}", flush=True)
    records = []
    for name, build in models.items():
        print(f"{name} ...", end=" ", flush=True)
        rec = report_one(name, build)
        records.append(rec)
        if "error" in rec:
            print(f"FAILED: {rec['error']}", flush=True)
        else:
            print(f"{rec['sites']} site(s), {rec['rewritten']} rewritten, dynamic={rec['dynamic']}, "
                  f"error {_fmt_err(rec['max_output_error'])}, load {rec['load_s']:.1f} s, "
                  f"conversion {rec['convert_s']:.1f} s", flush=True)
        gc.collect()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "site_report.json").write_text(json.dumps({"machine": machine, "models": records}, indent=2, default=str))
    md = markdown(records, machine)
    (args.out / "site_report.md").write_text(md)
    print()
    print(md)
    print(f"wrote {args.out / 'site_report.json'} and {args.out / 'site_report.md'}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
