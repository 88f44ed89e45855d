"""``parallax-compile``: inspect, convert, verify and export models from the command line.

MODEL is a built-in example (default ``nanogpt``; see ``parallax-compile models``), a Hugging Face
model directory, a directory written by ``convert``, or ``package.module:factory``. A user mistake
prints one line and exits 1; ``--debug`` shows the traceback instead. Progress lines go to stderr
(also when piped); ``--json`` prints the command's result as JSON on stdout (everything else on
stderr); third-party warnings and progress bars show only with ``--verbose``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

# Redirected to a file or CI log, rich would wrap tables at 80 columns and split words.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

DEFAULT_MODEL = "nanogpt"
MODEL_HELP = """\b
MODEL can be:
  a built-in name      nanogpt (default), lla, minilm, gemma3-270m, tiny-<family>, ...
                       (the list: parallax-compile models)
  a model directory    a Hugging Face directory with config.json, or a directory
                       written by `parallax-compile convert`
  a factory            package.module:function returning a module with
                       example_inputs, or (module, example_inputs)"""


def _quiet() -> None:
    """Silence what third-party libraries print unasked (warnings, torch.onnx's registration
    notes and progress prints, transformers' and hub progress bars); ``--verbose`` keeps them."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torch.onnx", "torch._export", "torch.export", "torch._dynamo", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _step(message: str):
    """A progress line on stderr (printed also when stderr is not a terminal, so piped and CI
    runs show what is running), with a spinner on a terminal and the time taken at the end."""
    start = time.perf_counter()
    err.print(f"{message} ...", highlight=False)
    if err.is_terminal:
        with err.status(message):
            yield
    else:
        yield
    err.print(f"  done in {time.perf_counter() - start:.1f} s", highlight=False)


def _json_mode() -> None:
    """``--json``: human-readable output moves to stderr; stdout gets only the JSON."""
    global console
    console = err


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _friendly(fn):
    """Turn exceptions into one line and exit code 1 (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if ctx.find_root().params.get("debug"):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise click.ClickException(f"{type(exc).__name__}: {msg}") from None

    return wrapper


def _load(spec: str, seq_len: int | None, batch_size: int):
    from .models import load_model

    with _step(f"Loading {spec}"):
        return load_model(spec, seq_len=seq_len, batch_size=batch_size)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def sites_table(sites, title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for col in ("#", "module", "form", "heads / kv", "head_dim", "scale", "causal / mask", "gqa", "query chain", "status"):
        table.add_column(col, overflow="fold")
    for i, s in enumerate(sites):
        heads = f"{_fmt(s.num_heads)} / {_fmt(s.num_kv_heads)}"
        status = f"[green]rewritten[/] ({s.max_error:.1e})" if s.rewritable and s.max_error is not None else (
            "[green]rewritten[/]" if s.rewritable else f"[yellow]skipped[/]: {s.reason}")
        form = s.form
        if s.ridge is not None:  # LLA: lambda (and CG iterations); converted approximately
            omega = s.nodes.get("lla_omega")
            form += (f" (lambda={s.ridge:g}" + (f", {s.cg_iterations} iterations" if s.cg_iterations else "")
                     + (f", omega={omega:g}" if omega is not None else "") + ")")
            if s.rewritable and s.fit:
                status = (f"[cyan]approximate[/] ({s.fit['probe_init']} probe; held-out error "
                          f"{s.max_error:.1e}, at r = 0 {s.fit['output_error_zero']:.1e})")
        table.add_row(str(i), s.module_path or "(root)", form, heads, _fmt(s.head_dim), _fmt(s.scale),
                      s.mask if not s.causal or s.mask != "none" else "causal", s.gqa,
                      " > ".join(s.query_chain) or "-", status)
    return table


def _summary(info) -> str:
    n, k = len(info.sites), len(info.rewritten)
    shapes = "dynamic batch/sequence" if info.dynamic else (info.note or "static shapes")
    return f"{n} attention site(s) found, {k} rewritten, {n - k} skipped; {shapes}"


def _shapes_line(manifest: dict) -> str:
    """What a saved conversion's manifest says about its shapes (the same words as :func:`_summary`)."""
    dims = manifest.get("dynamic_dims")
    if dims is None:  # written before the manifest recorded them
        return "dynamic batch/sequence" if manifest.get("dynamic") else (manifest.get("capture_note") or "static shapes")
    if not any(dims.values()):
        return manifest.get("capture_note") or "static shapes"
    listed = ", ".join(f"{k} dims {'/'.join(map(str, v))}" for k, v in dims.items() if v)
    return f"dynamic batch/sequence ({listed})"


model_arg = click.argument("model", required=False, default=DEFAULT_MODEL)
json_opt = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
seq_opt = click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Tokens per example sequence.")
batch_opt = click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=MODEL_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Show third-party warnings and progress bars.")
@click.version_option(package_name="parallax-compile")
def main(debug: bool, verbose: bool) -> None:
    """Find the attention in a PyTorch / Hugging Face model and rewrite it into Parallax attention."""
    if not verbose:
        _quiet()


@main.command()
@json_opt
def models(as_json: bool) -> None:
    """List the built-in MODEL names."""
    from .models import builtin_names

    if as_json:
        return _print_json(builtin_names())
    for name in builtin_names():
        console.print(name)


@main.command(epilog=MODEL_HELP)
@model_arg
@seq_opt
@batch_opt
@json_opt
@_friendly
def inspect(model: str, seq_len, batch_size, as_json: bool) -> None:
    """List the attention sites of MODEL and whether each can be rewritten (and why not)."""
    from .convert import run_conversion

    loaded = _load(model, seq_len, batch_size)
    with _step("Capturing with torch.export and matching attention"):
        from .calibrate import text_calibration

        _, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                       valid_positions=loaded.valid_positions,
                       calibration=lambda: text_calibration(loaded.example_inputs, n_tokens=2048))
    if as_json:
        return _print_json([s.as_dict() for s in info.sites])
    console.print(sites_table(info.sites, f"{model}: attention sites"))
    console.print(_summary(info))


@main.command(epilog=MODEL_HELP)
@model_arg
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write the converted model to.")
@seq_opt
@batch_opt
@click.option("--probe", type=click.Choice(["linear", "gated"]), default="linear", show_default=True,
              help="Probe per site: r = W_R x, or the gated ablation r = sigmoid(w_g . x) * W_R x (one gate per head).")
@click.option("--probe-init", type=click.Choice(["calibrated", "zero"]), default="calibrated", show_default=True,
              help="LLA sites (approximate): fit W_R to LLA's solved probe on calibration text, or start at 0.")
@click.option("--calibration-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="UTF-8 text for the LLA calibration (as byte ids; default: built-in prose).")
@json_opt
@click.option("--overwrite", is_flag=True,
              help="Replace OUTPUT even when it holds something else (files, another model's or a fine-tuned conversion).")
@_friendly
def convert(model: str, output: Path, seq_len, batch_size, probe, probe_init, calibration_text, as_json, overwrite) -> None:
    """Convert MODEL to Parallax attention, verify it and save it to OUTPUT.

    Softmax attention sites are converted exactly (checked at r = 0: W_R random, r_gain = 0). Local Linear Attention
    sites are converted approximately (a learned probe replaces the per-query solve) and reported
    with their fit error."""
    from .conversion_dir import check_output
    from .convert import run_conversion
    from .saving import save

    if as_json:
        _json_mode()
    check_output(output, source=_source(model), overwrite=overwrite)  # before any work: writable, not someone else's
    loaded = _load(model, seq_len, batch_size)
    if _is_hf_causal_lm(loaded.model):
        if probe != "linear" or calibration_text is not None:
            raise click.UsageError("--probe gated and --calibration-text apply to the graph conversion; a Hugging Face "
                                   "causal LM is upgraded in place with the plain probe r = W_R x")
        from .hf import NotUpgradable

        try:
            info = _convert_hf_causal_lm(model, loaded, output, overwrite)
            return _print_json(_conversion_json(info, output, "hf")) if as_json else None
        except NotUpgradable as e:  # e.g. GPT-2's fused c_attn: the graph converter handles it
            err.print(f"[yellow]note[/]: {e}\n  -> converting the captured graph instead (saved as model.pt2; "
                      "not a transformers model)")
    with _step("Converting (capture, match, rewrite, verify)"):
        from .calibrate import text_calibration

        text = calibration_text.read_text(encoding="utf-8") if calibration_text else None
        calibration = lambda: text_calibration(loaded.example_inputs, text)  # noqa: E731 - only if LLA sites
        gm, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                        valid_positions=loaded.valid_positions, probe=probe, probe_init=probe_init,
                        calibration=calibration)
    console.print(sites_table(info.sites, f"{model}: conversion"))
    console.print(_summary(info))
    if not info.rewritten:
        raise click.ClickException("no attention site could be rewritten; nothing saved")
    with _step(f"Saving to {output}"):
        save(gm, output, source=_source(model), overwrite=overwrite)
    if len(info.rewritten) > len(info.approximate):  # exact (softmax) sites
        console.print(f"model outputs at r = 0 (r_gain = 0): max relative error {info.max_output_error:.2e}")
    if info.approximate:
        console.print(f"[cyan]approximate[/]: {len(info.approximate)} LLA site(s) converted with a {probe_init} probe "
                      f"(Parallax equals LLA only with the per-query solved probe); model outputs vs the LLA "
                      f"model: relative RMS error {info.lla_output_error:.2e} (at r = 0: "
                      f"{info.lla_output_error_zero:.2e}). Fine-tune to close the gap.")
    console.print(f"saved to {output}  (check it with: parallax-compile verify {output})")
    if as_json:
        _print_json(_conversion_json(info, output, "graph"))


def _conversion_json(info, output: Path, kind: str) -> dict:
    return {"output": str(output), "kind": kind, "sites": [s.as_dict() for s in info.sites],
            "rewritten": len(info.rewritten), "dynamic": bool(info.dynamic),
            "max_output_error": info.max_output_error}


def _is_hf_causal_lm(model) -> bool:
    """A decoder-only transformers model that generates and dispatches attention through
    ``AttentionInterface`` (encoder-decoders such as T5 and encoders take the graph path)."""
    from .hf import is_hf_model

    return (is_hf_model(model) and getattr(model, "can_generate", bool)()
            and not getattr(model.config, "is_encoder_decoder", False))


def _source(model: str) -> str:
    """The spec recorded as a conversion's ``source`` (a model directory as an absolute path)."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def _convert_hf_causal_lm(model: str, loaded, output: Path, overwrite: bool):
    """A Hugging Face causal LM stays a transformers model: upgraded in place (probes on the attention
    modules, ``parallax`` attention implementation) and written as a Hugging Face model directory."""
    from .hf import save_hf, upgrade

    with _step("Converting (capture, match, upgrade, verify)"):
        info = upgrade(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                       valid_positions=loaded.valid_positions)
    console.print(sites_table(info.sites, f"{model}: conversion"))
    console.print(_summary(info))
    tokenizer_dir = getattr(loaded.model.config, "_name_or_path", None) or None
    if loaded.spec.startswith("gemma3-270m"):
        from .models.gemma3 import gemma3_270m_dir

        tokenizer_dir = gemma3_270m_dir()
    with _step(f"Saving to {output}"):
        save_hf(loaded.model, output, source=_source(model), tokenizer_dir=tokenizer_dir, overwrite=overwrite)
    console.print(f"model outputs at r = 0 (r_gain = 0): max relative error {info.max_output_error:.2e}")
    console.print(f"saved a Hugging Face model directory to {output}  (load it with parallax_compile.load("
                  f"{str(output)!r}) or AutoModelForCausalLM.from_pretrained after import parallax_compile; "
                  f"check it with: parallax-compile verify {output})")
    return info


@main.command()
@click.argument("converted", type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_opt
@_friendly
def verify(converted: Path, as_json: bool) -> None:
    """Re-check a saved conversion: the op against the float64 reference, and the outputs at
    r = 0 (r_gain = 0) against the original model's saved outputs."""
    from .conversion_dir import read_manifest
    from .saving import verify as run_verify

    if as_json:
        _json_mode()
    with _step(f"Verifying {converted}"):
        report = run_verify(converted)  # every kind of conversion directory
    table = Table(title=f"{converted}: Parallax nodes vs float64 reference")
    for col in ("node", "dtype", "rel. RMS error", "tolerance"):
        table.add_column(col)
    for e in report.op_errors:
        table.add_row(e["node"], e["dtype"], f"{e['error']:.2e}", f"{e['tolerance']:.0e}")
    console.print(table)
    gains = [v for n, v in report.probe_norms.items() if "r_gain" in n]
    weights = [v for n, v in report.probe_norms.items() if "r_gain" not in n]
    live = sum(1 for v in gains if v > 0)
    state = ("all zero: r = 0, the model computes softmax attention until the gains train" if gains and not live
             else f"{live} non-zero")
    compared = (f"max relative error {report.output_error:.2e}" if math.isfinite(report.output_error)
                else "not compared (see the note)")
    console.print(f"probes: {len(weights)} W_R tensor(s) ({sum(1 for v in weights if v > 0)} non-zero), "
                  f"{len(gains)} r_gain ({state}); outputs at r = 0 (r_gain = 0) vs original: {compared}")
    console.print(f"shapes: {_shapes_line(read_manifest(converted))}")
    for note in report.notes:
        console.print(f"note: {note}")
    if as_json:
        _print_json({"ok": report.ok, "op_errors": report.op_errors, "probe_norms": report.probe_norms,
                     "output_error": report.output_error if math.isfinite(report.output_error) else None,
                     "notes": report.notes, "problems": report.problems})
    if not report.ok:
        for p in report.problems:
            err.print(f"[red]FAIL[/]: {p}")
        sys.exit(1)
    console.print("[green]OK[/]")


def _convert_for_export(model: str, seq_len, batch_size, *, upgrade_hf: bool = False) -> dict:
    """What to export: MODEL converted now, or a saved conversion directory (``parallax-compile
    convert -o DIR``: a ``model.pt2`` program, or a Hugging Face directory with its probes).
    Returns the exporters' arguments (``source``, ``example_inputs``, ``dynamic_shapes``) and, for
    the ONNX Runtime check, the PyTorch module, its keyword inputs, the valid positions and the
    directory holding its tokenizer. ``upgrade_hf``: a Hugging Face causal LM is upgraded in place
    (as ``convert`` does; it then exports with its KV cache) instead of converted as a graph."""
    import torch

    from .conversion_dir import is_conversion_dir, read_manifest

    saved = Path(model)
    if saved.is_dir() and is_conversion_dir(saved):
        from .saving import MODEL_FILE, _read, load

        if read_manifest(saved)["kind"] == "huggingface":  # the trained probes; the attention calls the Parallax op
            from safetensors.torch import load_file

            module = load(saved, dtype=torch.float32).eval()
            ref = load_file(saved / "reference.safetensors")
            kwargs = {k[len("input."):]: v for k, v in ref.items() if k.startswith("input.")}
            kwargs |= read_manifest(saved).get("input_constants", {})
            auto = torch.export.Dim.AUTO
            dims = {k: ({0: auto, 1: auto} if isinstance(v, torch.Tensor) else None) for k, v in kwargs.items()}
            console.print(f"{saved}: saved Hugging Face conversion ({type(module).__name__})")
            return dict(source=module, example_inputs=kwargs, dynamic_shapes=dims, module=module, inputs=kwargs,
                        valid=None, tokenizer_dir=saved)
        if (saved / MODEL_FILE).exists():
            gm = load(saved)  # imports the pytree types its inputs/outputs need
            _, args, kwargs, _ = _read(saved)
            if args:
                raise click.ClickException(f"{saved}: export takes models called with keyword inputs only")
            console.print(f"{saved}: saved conversion, {len(gm.meta['parallax_report']['sites'])} site(s)")
            return dict(source=torch.export.load(saved / MODEL_FILE), example_inputs=None, dynamic_shapes="auto",
                        module=gm, inputs=kwargs, valid=None, tokenizer_dir=None)
    from .convert import run_conversion

    loaded = _load(model, seq_len, batch_size)
    tokenizer_dir = getattr(getattr(loaded.model, "config", None), "_name_or_path", None) or None
    if upgrade_hf and _is_hf_causal_lm(loaded.model):
        from .hf import NotUpgradable, upgrade

        try:
            with _step("Converting (capture, match, upgrade, verify)"):
                info = upgrade(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                               valid_positions=loaded.valid_positions)
            console.print(_summary(info))
            inputs = {k: v for k, v in loaded.example_inputs.items() if k != "use_cache"}
            return dict(source=loaded.model, example_inputs=None, dynamic_shapes=None, module=loaded.model,
                        inputs=inputs, valid=loaded.valid_positions, tokenizer_dir=tokenizer_dir)
        except NotUpgradable as e:
            err.print(f"[yellow]note[/]: {e}\n  -> exporting the converted graph instead")
    with _step("Converting (capture, match, rewrite, verify)"):
        gm, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                                  valid_positions=loaded.valid_positions)
    console.print(_summary(info))
    if not info.rewritten:
        raise click.ClickException("no attention site could be rewritten; nothing exported")
    return dict(source=gm, example_inputs=None, dynamic_shapes="auto", module=gm, inputs=loaded.example_inputs,
                valid=loaded.valid_positions, tokenizer_dir=tokenizer_dir, config=getattr(loaded.model, "config", None))


@main.group("export")
def export_group() -> None:
    """Export a converted MODEL to ONNX (Parallax as one custom-domain node plus the standard-op
    function stock ONNX Runtime inlines) or to MLIR (torch-mlir)."""


def _refuse_output_option(ctx, _param, value):
    if value is not None:
        raise click.UsageError(f"export onnx writes a directory, as optimum-cli does: pass it as OUT_DIR, e.g. "
                               f"`parallax-compile export onnx {ctx.params.get('model', 'MODEL')} "
                               f"{Path(value).with_suffix('')}/` (model.onnx is written inside)")
    return value


@export_group.command("onnx", epilog=MODEL_HELP)
@click.argument("model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", hidden=True, expose_value=False, callback=_refuse_output_option)
@click.option("--opset", type=click.IntRange(min=18), default=None, help="Default ONNX opset (default 20).")
@click.option("--fp16", is_flag=True, help="Convert the exported graph to float16.")
@click.option("--accumulate", type=click.Choice(["float", "double"]), default="float", show_default=True,
              help="Type the Parallax function body computes in.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=8, show_default=True,
              help="Decoders: greedy tokens generated in ONNX Runtime and PyTorch, which must be equal.")
@seq_opt
@batch_opt
@json_opt
@_friendly
def export_onnx_cmd(model: str, out_dir: Path, opset, fp16: bool, accumulate: str, new_tokens: int, seq_len,
                    batch_size, as_json: bool) -> None:
    """Convert MODEL (or take a saved conversion directory) and write OUT_DIR/model.onnx as
    optimum-cli does (named inputs, outputs and dims; config and tokenizer beside it; a decoder
    with its KV cache: past_key_values.N.key/value in, present.N.key/value out; a graph model is
    cached only when that is exact, otherwise a note says why). Then check it in ONNX Runtime:
    the max relative error against PyTorch (non-padding positions) and, for decoders, greedy
    generation token by token against PyTorch (model.generate; for graph models, recomputing the
    whole prefix each step). Exits 1 when the error exceeds the tolerance or the tokens differ."""
    from .export.onnx_dir import export_onnx_dir
    from .export.onnx_function import DOMAIN, DOMAIN_VERSION, OP_TYPE

    if out_dir.suffix == ".onnx":
        raise click.UsageError(f"OUT_DIR must be a directory, not a .onnx file (model.onnx is written inside it, "
                               f"as optimum-cli does): parallax-compile export onnx {model} "
                               f"{out_dir.with_suffix('')}/")
    if as_json:
        _json_mode()
    job = _convert_for_export(model, seq_len, batch_size, upgrade_hf=True)
    with _step(f"Exporting to {out_dir}/ (torch.onnx) and checking it in ONNX Runtime"):
        report = export_onnx_dir(out_dir, job["module"], job["inputs"], source=job["source"],
                                 example_inputs=job["example_inputs"], dynamic_shapes=job["dynamic_shapes"],
                                 valid=job["valid"], tokenizer_dir=job["tokenizer_dir"], config=job.get("config"),
                                 opset=opset, fp16=fp16, accumulate=accumulate, new_tokens=new_tokens)
    if report.kv_cache_note:
        err.print(f"[yellow]note[/]: model.onnx has no KV cache: {report.kv_cache_note}", highlight=False)
    console.print(f"wrote {out_dir}/: {', '.join(report.files)}; {report.parallax_nodes} {DOMAIN}::{OP_TYPE} "
                  f"v{DOMAIN_VERSION} node(s), opset {report.opset}; checker (full) OK")
    for kind, names in (("inputs: ", report.inputs), ("outputs:", report.outputs)):
        shown = [f"{n} [{', '.join(map(str, report.dims[n]))}]" for n in names[:4]]
        console.print(f"{kind} " + "; ".join(shown) + (f"; ... ({len(names)} in all)" if len(names) > 4 else ""),
                      highlight=False, markup=False)  # [batch_size, ...] is not rich markup
    console.print(f"ONNX Runtime vs PyTorch: max relative error {report.error:.2e} (tolerance {report.tolerance:.0e})")
    if report.kv_cache:
        same = "equal" if report.tokens_equal else "DIFFERENT"
        console.print(f"greedy generation with the KV cache, {report.generated_tokens} new tokens: ONNX Runtime and "
                      f"PyTorch tokens {same}")
    if as_json:
        _print_json(report.as_dict())
    if not report.ok:
        raise click.ClickException(
            f"the ONNX model does not match PyTorch: error {report.error:.2e} (tolerance {report.tolerance:.0e})"
            + ("" if report.tokens_equal is not False else ", greedy tokens differ"))


@export_group.command("mlir", epilog=MODEL_HELP)
@model_arg
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="MLIR text file to write.")
@click.option("--output-type", type=click.Choice(["raw", "torch", "linalg-on-tensors", "stablehlo"]),
              default="raw", show_default=True,
              help="raw keeps Parallax as one torch.operator; the others decompose it (reference math).")
@seq_opt
@batch_opt
@json_opt
@_friendly
def export_mlir_cmd(model: str, output: Path, output_type: str, seq_len, batch_size, as_json: bool) -> None:
    """Convert MODEL (or take a saved conversion directory) and write it as MLIR through torch-mlir."""
    from .export.mlir import export_mlir

    if as_json:
        _json_mode()
    job = _convert_for_export(model, seq_len, batch_size)
    with _step(f"Importing into MLIR ({output_type})"):
        text = str(export_mlir(job["source"], job["example_inputs"], output, output_type=output_type,
                               dynamic_shapes=job["dynamic_shapes"]))
    n = text.count('torch.operator "torch.parallax.attention"')
    console.print(f"wrote {output} ({output_type}, {len(text) / 1e6:.1f} MB of text; "
                  f"{n} Parallax operation(s) kept as torch.operator)")
    if as_json:
        _print_json({"output": str(output), "output_type": output_type, "parallax_operations": n})


if __name__ == "__main__":  # pragma: no cover
    main()
