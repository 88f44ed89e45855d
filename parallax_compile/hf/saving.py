"""The Hugging Face kind of conversion directory (``kind: "huggingface"``).

What ``save_pretrained`` of a ``Parallax<Base>`` model writes (:mod:`parallax_compile.hf.auto`):
``config.json`` (``model_type: "parallax"``, ``parallax_probes``, ``auto_map``),
``model.safetensors`` with every probe, ``parallax_model.py``, and -- from the conversion record
the model carries -- the manifest ``parallax.json`` and ``reference.safetensors`` (the example
inputs and the original model's outputs), so ``parallax-compile verify`` re-checks it without the
original model. :func:`save_hf` adds the tokenizer and writes atomically.
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
from ..checks import is_probe, main_output, outputs_error, tensor_digests, within_fp32_rounding
from ..conversion_dir import (FORMAT_VERSION, MANIFEST_FILE, REFERENCE_FILE, check_output, model_digest,
                              read_manifest, record_weights, warn_unrecorded, write_atomically)
from ..convert import ConversionInfo
from ..reference import parallax_attention_ref
from ..saving import OP_TOLERANCE, VerifyReport, check_weights
from . import attention

__all__ = ["conversion_record", "is_hf_dir", "read_record", "save_hf", "verify_hf", "write_record"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja")


def conversion_record(info: ConversionInfo, source: str | None = None) -> dict:
    """What a converted model carries so its saves can write the manifest and reference:
    ``{"manifest", "reference", "conversion_digests", "trained", "loaded_from", "tokenizer_dir"}``."""
    tensors = {f"input.{k}": v.detach().contiguous() for k, v in info.example_kwargs.items()
               if isinstance(v, torch.Tensor)}
    tensors["output.0"] = info.reference_outputs.detach().contiguous()
    manifest = {
        "source": source,
        "max_output_error": info.max_output_error,
        "input_constants": {k: v for k, v in info.example_kwargs.items() if not isinstance(v, torch.Tensor)},
        "dynamic": True,
        "dynamic_dims": {k: [0, 1] for k, v in info.example_kwargs.items() if isinstance(v, torch.Tensor)},
        "shapes_note": "a transformers model run eagerly: any batch size and sequence length",
        "sites": [s.as_dict() for s in info.sites],
    }
    return {"manifest": manifest, "reference": tensors, "conversion_digests": dict(info.digests), "trained": [],
            "loaded_from": None, "tokenizer_dir": None}


def read_record(path) -> dict | None:
    """The conversion record of a Hugging Face conversion directory (``None`` without a manifest)."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        return None
    manifest = read_manifest(path)
    reference = load_file(path / REFERENCE_FILE) if (path / REFERENCE_FILE).is_file() else {}
    keep = ("source", "max_output_error", "input_constants", "dynamic", "dynamic_dims", "shapes_note", "sites")
    conversion = manifest.get("conversion_digests")
    if conversion is None:  # format 1: unknown; changed weights cannot be told apart from trained ones
        conversion = {}
    return {"manifest": {k: manifest[k] for k in keep if k in manifest}, "reference": reference,
            "conversion_digests": conversion, "trained": list(manifest.get("trained", [])),
            "loaded_from": str(path.resolve()), "tokenizer_dir": str(path.resolve())}


def write_record(model, out: Path, *, trained: bool) -> None:
    """Write ``parallax.json`` and ``reference.safetensors`` of ``model`` (a ``Parallax<Base>`` with a
    conversion record) into ``out``, beside what ``save_pretrained`` wrote."""
    record = model.parallax_record
    manifest = {"format_version": FORMAT_VERSION, "kind": "huggingface"}
    unrecorded = record_weights(manifest, tensor_digests(model), record["conversion_digests"], trained=trained,
                                earlier_trained=record["trained"])
    warn_unrecorded(unrecorded, "call model.train() before training, or save_pretrained(..., parallax_trained=True),")
    manifest |= {
        "parallax_compile": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **record["manifest"],
        "model_class": type(model).__name__,
        "base_architecture": model.parallax_base_architecture,
        "load": "parallax_compile.load(path) or, after import parallax_compile, "
                "transformers.AutoModelForCausalLM.from_pretrained(path)",
    }
    save_file(record["reference"], out / REFERENCE_FILE)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))


def save_hf(model, directory, *, source: str | None = None, trained: bool = False, overwrite: bool = False,
            tokenizer_dir=None) -> Path:
    """Write a converted Hugging Face model (from :func:`~parallax_compile.hf.upgrade` or loaded from
    a conversion directory, trained or not) to the conversion directory ``directory``, atomically:
    ``save_pretrained``, the manifest and reference, and the tokenizer files of ``tokenizer_dir``
    (default: the directory the model was loaded from). ``trained``: record changed non-probe
    weights as trained (also recorded when the model was put in training mode). Raises
    ``ValueError`` for a model without a conversion record,
    :class:`~parallax_compile.conversion_dir.OutputNotAllowed` as :func:`parallax_compile.save`."""
    record = getattr(model, "parallax_record", None)
    if record is None:
        raise ValueError(f"save: {type(model).__name__} carries no conversion record; pass a model from "
                         "parallax_compile.hf.upgrade or parallax_compile.load")
    if source is not None:
        record["manifest"]["source"] = source
    if tokenizer_dir is not None:
        record["tokenizer_dir"] = str(tokenizer_dir)
    check_output(directory, source=record["manifest"].get("source"),
                 model_id=model_digest(record["conversion_digests"]) if record["conversion_digests"] else None,
                 loaded_from=record["loaded_from"], overwrite=overwrite)
    with write_atomically(directory) as tmp:
        model.save_pretrained(tmp, parallax_trained=bool(trained or model.parallax_trained))
        src = record["tokenizer_dir"]
        for name in _TOKENIZER_FILES if src else ():
            if (Path(src) / name).is_file():
                shutil.copy2(Path(src) / name, tmp / name)
    return Path(directory)


def is_hf_dir(directory) -> bool:
    """Whether ``directory`` holds a Hugging Face conversion (manifest kind ``"huggingface"``)."""
    try:
        return read_manifest(directory)["kind"] == "huggingface"
    except (OSError, ValueError):
        return False


def _within_rounding(model, kwargs, new, ref, valid) -> bool:
    """The fp32 fallback of the ``r = 0`` check (:func:`~parallax_compile.checks.within_fp32_rounding`):
    the original model is the loaded one with its probes removed, run in float64 with eager attention."""
    from .upgrade import original_float64

    owners = [n for n, m in model.named_modules() if getattr(m, "parallax_probe", False)]
    return within_fp32_rounding(new, ref, original_float64(model, owners, "eager", (), kwargs), valid)


def verify_hf(directory) -> VerifyReport:
    """Re-check a Hugging Face conversion directory (same checks as
    :func:`parallax_compile.saving.verify`): every tensor against the manifest's digests, every
    Parallax attention call against the float64 reference with the saved probes, then (unless
    non-probe weights are recorded as trained) the outputs at ``r = 0`` (``r_gain = 0``) against the original
    model's."""
    from .auto import load_pretrained

    directory = Path(directory)
    report = read_manifest(directory)
    tensors = load_file(directory / REFERENCE_FILE)
    kwargs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
    kwargs |= report.get("input_constants", {})
    model = load_pretrained(directory, dtype="auto").eval()
    result = VerifyReport(ok=True)
    trained = check_weights(model, report, result)
    model = model.float()
    probes = {n: p for n, p in model.named_parameters() if is_probe(n)}
    result.probe_norms = {n: p.detach().norm().item() for n, p in probes.items()}
    names = {id(m): n for n, m in model.named_modules()}

    def check(module, q, r, k, v, mask, scale, causal, window, out):
        up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
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
    if trained:
        result.output_error = math.nan
    else:
        saved = {n: p.detach().clone() for n, p in probes.items()}
        with torch.no_grad():
            for p in probes.values():
                p.zero_()
            new = main_output(model(**kwargs))
            for n, p in probes.items():
                p.copy_(saved[n])
        ref = tensors["output.0"]
        mask = kwargs.get("attention_mask")
        valid = mask.bool() if isinstance(mask, torch.Tensor) and not bool(mask.all()) else None
        err, ok = outputs_error(new, ref, valid)
        result.output_error = err
        if not ok and not _within_rounding(model, kwargs, new, ref, valid):
            result.problems.append(f"output differs from the original model at r = 0 (r_gain = 0) by {err:.2e}")
    if not result.op_errors:
        result.problems.append("no Parallax attention ran (is the model's attention implementation 'parallax'?)")
    result.ok = not result.problems
    return result
