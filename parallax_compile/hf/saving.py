"""Save and re-verify an upgraded transformers model as a Hugging Face model directory.

The directory is what ``save_pretrained`` writes (``config.json`` with ``parallax_probes``,
``model.safetensors`` including every ``<owner>.r_proj.weight``, the tokenizer when there is one)
plus, as for the graph format (:mod:`parallax_compile.saving`), ``parallax.json`` (the site
report, ``"format": "hf"``) and ``reference.safetensors`` (the example inputs and the original
model's outputs), so ``parallax-compile verify`` can re-check it without the original model.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..convert import TOLERANCE, ConversionInfo, is_probe, relative_error, weights_digest
from ..reference import parallax_attention_ref
from ..saving import OP_TOLERANCE, REFERENCE_FILE, REPORT_FILE, VerifyReport
from . import attention
from .upgrade import _outputs, from_pretrained

__all__ = ["is_hf_dir", "save_hf", "verify_hf"]

FORMAT = "hf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "generation_config.json")


def save_hf(model, info: ConversionInfo, directory, *, source: str | None = None, tokenizer_dir=None) -> Path:
    """``model.save_pretrained(directory)``, the tokenizer files of ``tokenizer_dir``, the report and
    the reference outputs. Returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and not (out / name).exists():
                shutil.copy2(src, out / name)
    inputs = {k: v for k, v in info.example_kwargs.items() if isinstance(v, torch.Tensor)}
    consts = {k: v for k, v in info.example_kwargs.items() if not isinstance(v, torch.Tensor)}
    tensors = {f"input.{k}": v.contiguous() for k, v in inputs.items()}
    tensors["output.0"] = info.reference_outputs.detach().contiguous()
    save_file(tensors, out / REFERENCE_FILE)
    report = {
        "format": FORMAT,
        "parallax_compile": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "model_class": type(model).__name__,
        "load": "parallax_compile.hf.from_pretrained(path)",
        "max_output_error": info.max_output_error,
        "input_constants": consts,
        "weights_digest": info.weights_digest,
        "sites": [s.as_dict() for s in info.sites],
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return out


def is_hf_dir(directory) -> bool:
    """Whether ``directory`` holds a conversion saved by :func:`save_hf`."""
    try:
        return json.loads((Path(directory) / REPORT_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def verify_hf(directory) -> VerifyReport:
    """Re-check a directory written by :func:`save_hf` (same checks as
    :func:`parallax_compile.saving.verify`): every Parallax attention call against the float64
    reference with the saved probes, then the outputs at ``W_R = 0`` against the original model's."""
    directory = Path(directory)
    report = json.loads((directory / REPORT_FILE).read_text())
    tensors = load_file(directory / REFERENCE_FILE)
    kwargs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
    kwargs |= report.get("input_constants", {})
    model = from_pretrained(directory, dtype=torch.float32).eval()
    result = VerifyReport(ok=True)
    probes = {n: p for n, p in model.named_parameters() if is_probe(n)}
    result.probe_norms = {n: p.detach().norm().item() for n, p in probes.items()}
    names = {id(m): n for n, m in model.named_modules()}

    def check(module, q, r, k, v, mask, scale, causal, window, out):
        up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        ref = parallax_attention_ref(up(q), up(r), up(k), up(v), scale=scale, causal=causal, window_size=window,
                                     attn_mask=mask)
        err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        result.op_errors.append({"node": names.get(id(module), "?"), "dtype": str(q.dtype), "error": err,
                                 "tolerance": OP_TOLERANCE[q.dtype]})

    attention.OBSERVERS.append(check)
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        attention.OBSERVERS.remove(check)
    for e in result.op_errors:
        if not e["error"] <= e["tolerance"]:
            result.problems.append(f"Parallax attention {e['node']}: error {e['error']:.2e} > {e['tolerance']:.0e}")
    if report.get("weights_digest") and weights_digest(model) != report["weights_digest"]:
        result.notes.append("non-probe weights changed since conversion (full fine-tuning): the "
                            "comparison with the original model's outputs does not apply; skipped")
        result.output_error = math.nan
    else:
        saved = {n: p.detach().clone() for n, p in probes.items()}
        with torch.no_grad():
            for p in probes.values():
                p.zero_()
            new = _outputs(model(**kwargs))
            for n, p in probes.items():
                p.copy_(saved[n])
        ref = tensors["output.0"]
        mask = kwargs.get("attention_mask")
        valid = mask.bool() if isinstance(mask, torch.Tensor) and not bool(mask.all()) else None
        err = relative_error(new, ref, valid)
        result.output_error = err
        if not err <= TOLERANCE.get(ref.dtype, 1e-5):
            result.problems.append(f"output differs from the original model at W_R = 0 by {err:.2e}")
    if not result.op_errors:
        result.problems.append("no Parallax attention ran (is the model's attention implementation 'parallax'?)")
    result.ok = not result.problems
    return result
