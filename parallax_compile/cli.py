"""``parallax-compile``: inspect, convert and verify models from the command line.

MODEL is a built-in example (default ``nanogpt``; see ``parallax-compile models``), a Hugging Face
model directory, or ``package.module:factory``. A user mistake prints one line and exits 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

# Redirected to a file or CI log, rich would wrap tables at 80 columns and split words.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

DEFAULT_MODEL = "nanogpt"


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

    with err.status(f"Loading {spec} ..."):
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
                          f"{s.max_error:.1e}, at W_R = 0 {s.fit['output_error_zero']:.1e})")
        table.add_row(str(i), s.module_path or "(root)", form, heads, _fmt(s.head_dim), _fmt(s.scale),
                      s.mask if not s.causal or s.mask != "none" else "causal", s.gqa,
                      " > ".join(s.query_chain) or "-", status)
    return table


def _summary(info) -> str:
    n, k = len(info.sites), len(info.rewritten)
    shapes = "dynamic batch/sequence" if info.dynamic else (info.note or "static shapes")
    return f"{n} attention site(s) found, {k} rewritten, {n - k} skipped; {shapes}"


model_arg = click.argument("model", required=False, default=DEFAULT_MODEL)
seq_opt = click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Tokens per example sequence.")
batch_opt = click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="parallax-compile")
def main(debug: bool) -> None:
    """Find the attention in a PyTorch / Hugging Face model and rewrite it into Parallax attention."""


@main.command()
def models() -> None:
    """List the built-in MODEL names."""
    from .models import builtin_names

    for name in builtin_names():
        console.print(name)


@main.command()
@model_arg
@seq_opt
@batch_opt
@click.option("--json", "as_json", is_flag=True, help="Print the sites as JSON.")
@_friendly
def inspect(model: str, seq_len, batch_size, as_json: bool) -> None:
    """List the attention sites of MODEL and whether each can be rewritten (and why not)."""
    from .convert import run_conversion

    loaded = _load(model, seq_len, batch_size)
    with err.status("Capturing with torch.export and matching attention ..."):
        from .calibrate import text_calibration

        _, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                       valid_positions=loaded.valid_positions,
                       calibration=lambda: text_calibration(loaded.example_inputs, n_tokens=2048))
    if as_json:
        import json

        console.print_json(json.dumps([s.as_dict() for s in info.sites], default=str))
        return
    console.print(sites_table(info.sites, f"{model}: attention sites"))
    console.print(_summary(info))


@main.command()
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
@_friendly
def convert(model: str, output: Path, seq_len, batch_size, probe, probe_init, calibration_text) -> None:
    """Convert MODEL to Parallax attention, verify it and save it to OUTPUT.

    Softmax attention sites are converted exactly (checked at W_R = 0). Local Linear Attention
    sites are converted approximately (a learned probe replaces the per-query solve) and reported
    with their fit error."""
    from .convert import run_conversion
    from .saving import save

    loaded = _load(model, seq_len, batch_size)
    if _is_hf_causal_lm(loaded.model):
        if probe != "linear" or calibration_text is not None:
            raise click.UsageError("--probe gated and --calibration-text apply to the graph conversion; a Hugging Face "
                                   "causal LM is upgraded in place with the plain probe r = W_R x")
        from .hf import NotUpgradable

        try:
            return _convert_hf_causal_lm(model, loaded, output)
        except NotUpgradable as e:  # e.g. GPT-2's fused c_attn: the graph converter handles it
            err.print(f"[yellow]note[/]: {e}\n  -> converting the captured graph instead (saved as model.pt2; "
                      "not a transformers model)")
    with err.status("Converting (capture, match, rewrite, verify) ..."):
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
    with err.status(f"Saving to {output} ..."):
        save(gm, output, source=loaded.spec)
    if len(info.rewritten) > len(info.approximate):  # exact (softmax) sites
        console.print(f"model outputs at W_R = 0: max relative error {info.max_output_error:.2e}")
    if info.approximate:
        console.print(f"[cyan]approximate[/]: {len(info.approximate)} LLA site(s) converted with a {probe_init} probe "
                      f"(Parallax equals LLA only with the per-query solved probe); model outputs vs the LLA "
                      f"model: relative RMS error {info.lla_output_error:.2e} (at W_R = 0: "
                      f"{info.lla_output_error_zero:.2e}). Fine-tune to close the gap.")
    console.print(f"saved to {output}  (check it with: parallax-compile verify {output})")


def _is_hf_causal_lm(model) -> bool:
    """A decoder-only transformers model that generates and dispatches attention through
    ``AttentionInterface`` (encoder-decoders such as T5 and encoders take the graph path)."""
    from .hf import is_hf_model

    return (is_hf_model(model) and getattr(model, "can_generate", bool)()
            and not getattr(model.config, "is_encoder_decoder", False))


def _convert_hf_causal_lm(model: str, loaded, output: Path) -> None:
    """A Hugging Face causal LM stays a transformers model: upgraded in place (probes on the attention
    modules, ``parallax`` attention implementation) and written as a Hugging Face model directory."""
    from .hf import save_hf, upgrade

    with err.status("Converting (capture, match, upgrade, verify) ..."):
        info = upgrade(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                       valid_positions=loaded.valid_positions)
    console.print(sites_table(info.sites, f"{model}: conversion"))
    console.print(_summary(info))
    tokenizer_dir = getattr(loaded.model.config, "_name_or_path", None) or None
    if loaded.spec.startswith("gemma3-270m"):
        from .models.gemma3 import gemma3_270m_dir

        tokenizer_dir = gemma3_270m_dir()
    with err.status(f"Saving to {output} ..."):
        save_hf(loaded.model, info, output, source=loaded.spec, tokenizer_dir=tokenizer_dir)
    console.print(f"model outputs at W_R = 0: max relative error {info.max_output_error:.2e}")
    console.print(f"saved a Hugging Face model directory to {output}  (load it with "
                  f"parallax_compile.hf.from_pretrained({str(output)!r}); check it with: parallax-compile verify {output})")


@main.command()
@click.argument("converted", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_friendly
def verify(converted: Path) -> None:
    """Re-check a saved conversion: the op against the float64 reference, and the outputs at
    W_R = 0 against the original model's saved outputs."""
    from .saving import verify as run_verify

    with err.status(f"Verifying {converted} ..."):
        if (converted / "config.json").is_file():  # a Hugging Face directory from a causal LM conversion
            from .hf import is_hf_dir, verify_hf

            run_verify = verify_hf if is_hf_dir(converted) else run_verify
        report = run_verify(converted)
    table = Table(title=f"{converted}: Parallax nodes vs float64 reference")
    for col in ("node", "dtype", "rel. RMS error", "tolerance"):
        table.add_column(col)
    for e in report.op_errors:
        table.add_row(e["node"], e["dtype"], f"{e['error']:.2e}", f"{e['tolerance']:.0e}")
    console.print(table)
    nonzero = sum(1 for v in report.probe_norms.values() if v > 0)
    compared = (f"max relative error {report.output_error:.2e}" if math.isfinite(report.output_error)
                else "not compared (see the note)")
    console.print(f"probes: {len(report.probe_norms)} ({nonzero} non-zero); outputs at W_R = 0 vs original: {compared}")
    for note in report.notes:
        console.print(f"note: {note}")
    if not report.ok:
        for p in report.problems:
            err.print(f"[red]FAIL[/]: {p}")
        sys.exit(1)
    console.print("[green]OK[/]")


def _convert_for_export(model: str, seq_len, batch_size) -> dict:
    """What to export: MODEL converted now, or a saved conversion directory (``parallax-compile
    convert -o DIR``: a ``model.pt2`` program, or a Hugging Face directory with its probes).
    Returns the exporters' arguments (``source``, ``example_inputs``, ``dynamic_shapes``) and, for
    the ONNX Runtime check, the PyTorch module, its keyword inputs and the valid positions."""
    import torch

    saved = Path(model)
    if saved.is_dir() and (saved / "parallax.json").exists():
        from .hf import from_pretrained, is_hf_dir
        from .saving import MODEL_FILE, _read, load

        if is_hf_dir(saved):  # probes restored; the attention calls the Parallax op
            import json

            from safetensors.torch import load_file

            module = from_pretrained(saved, dtype=torch.float32).eval()
            ref = load_file(saved / "reference.safetensors")
            kwargs = {k[len("input."):]: v for k, v in ref.items() if k.startswith("input.")}
            kwargs |= json.loads((saved / "parallax.json").read_text()).get("input_constants", {})
            auto = torch.export.Dim.AUTO
            dims = {k: ({0: auto, 1: auto} if isinstance(v, torch.Tensor) else None) for k, v in kwargs.items()}
            console.print(f"{saved}: saved Hugging Face conversion ({type(module).__name__})")
            return dict(source=module, example_inputs=kwargs, dynamic_shapes=dims, module=module, inputs=kwargs,
                        valid=None)
        if (saved / MODEL_FILE).exists():
            gm = load(saved)  # imports the pytree types its inputs/outputs need
            _, args, kwargs, _ = _read(saved)
            if args:
                raise click.ClickException(f"{saved}: export takes models called with keyword inputs only")
            console.print(f"{saved}: saved conversion, {len(gm.meta['parallax_report']['sites'])} site(s)")
            return dict(source=torch.export.load(saved / MODEL_FILE), example_inputs=None, dynamic_shapes="auto",
                        module=gm, inputs=kwargs, valid=None)
    from .convert import run_conversion

    loaded = _load(model, seq_len, batch_size)
    with err.status("Converting (capture, match, rewrite, verify) ..."):
        gm, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                                  valid_positions=loaded.valid_positions)
    console.print(_summary(info))
    if not info.rewritten:
        raise click.ClickException("no attention site could be rewritten; nothing exported")
    return dict(source=gm, example_inputs=None, dynamic_shapes="auto", module=gm, inputs=loaded.example_inputs,
                valid=loaded.valid_positions)


@main.group("export")
def export_group() -> None:
    """Export a converted MODEL to ONNX (Parallax as one custom-domain node plus the standard-op
    function stock ONNX Runtime inlines) or to MLIR (torch-mlir)."""


@export_group.command("onnx")
@model_arg
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="ONNX file to write.")
@click.option("--opset", type=click.IntRange(min=18), default=None, help="Default ONNX opset (default 20).")
@click.option("--fp16", is_flag=True, help="Convert the exported graph to float16.")
@click.option("--accumulate", type=click.Choice(["float", "double"]), default="float", show_default=True,
              help="Type the Parallax function body computes in.")
@seq_opt
@batch_opt
@_friendly
def export_onnx_cmd(model: str, output: Path, opset, fp16: bool, accumulate: str, seq_len, batch_size) -> None:
    """Convert MODEL (or take a saved conversion directory) and write it as ONNX; then run the
    file in ONNX Runtime on the example inputs and print its max relative error against PyTorch
    (non-padding positions)."""
    import onnx
    import torch
    from torch.utils import _pytree as pytree

    from .convert import relative_error
    from .export.onnx import export_onnx, parallax_nodes, run_onnx
    from .export.onnx_function import DOMAIN, DOMAIN_VERSION, OP_TYPE

    job = _convert_for_export(model, seq_len, batch_size)
    with err.status(f"Exporting to {output} (torch.onnx, dynamo) ..."):
        export_onnx(job["source"], job["example_inputs"], output, dynamic_shapes=job["dynamic_shapes"],
                    opset=opset, fp16=fp16, accumulate=accumulate)
    proto = onnx.load(str(output), load_external_data=False)
    console.print(f"wrote {output}: {len(parallax_nodes(proto))} {DOMAIN}::{OP_TYPE} v{DOMAIN_VERSION} node(s), "
                  f"opset {next(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx'))}; "
                  f"checker (full) OK")
    with err.status("Running it in ONNX Runtime ..."):
        got = torch.from_numpy(run_onnx(output, job["inputs"])[0]).float()
        with torch.no_grad():
            want = pytree.tree_leaves(job["module"](**job["inputs"]))[0]
    error = relative_error(got, want, job["valid"])
    console.print(f"ONNX Runtime vs PyTorch: max relative error {error:.2e}")


@export_group.command("mlir")
@model_arg
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="MLIR text file to write.")
@click.option("--output-type", type=click.Choice(["raw", "torch", "linalg-on-tensors", "stablehlo"]),
              default="raw", show_default=True,
              help="raw keeps Parallax as one torch.operator; the others decompose it (reference math).")
@seq_opt
@batch_opt
@_friendly
def export_mlir_cmd(model: str, output: Path, output_type: str, seq_len, batch_size) -> None:
    """Convert MODEL (or take a saved conversion directory) and write it as MLIR through torch-mlir."""
    from .export.mlir import export_mlir

    job = _convert_for_export(model, seq_len, batch_size)
    with err.status(f"Importing into MLIR ({output_type}) ..."):
        text = str(export_mlir(job["source"], job["example_inputs"], output, output_type=output_type,
                               dynamic_shapes=job["dynamic_shapes"]))
    n = text.count('torch.operator "torch.parallax.attention"')
    console.print(f"wrote {output} ({output_type}, {len(text) / 1e6:.1f} MB of text; "
                  f"{n} Parallax operation(s) kept as torch.operator)")


if __name__ == "__main__":  # pragma: no cover
    main()
