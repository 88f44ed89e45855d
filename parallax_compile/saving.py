"""Save, load and re-verify a converted model: one conversion directory, one loader.

:func:`save`, :func:`load` and :func:`verify` take every kind of conversion directory
(:mod:`parallax_compile.conversion_dir`): a graph conversion (``kind: "graph"``) holds

* ``model.pt2``: the converted program (``torch.export.save``); every Parallax site is one
  ``parallax.attention`` node, so ``import parallax_compile`` before loading;
* ``parallax.json``: the manifest (sites found, rewritten, skipped and why; dynamic dims; weight
  digests; what was trained), versions, source;
* ``reference.safetensors``: the example inputs and the **original** model's outputs on them,
  so ``verify`` can prove, without the original model, that the saved model at ``r = 0`` (``r_gain = 0``) is
  still that model.

A Hugging Face conversion (``kind: "huggingface"``) is a transformers model directory with the
same manifest and reference (:mod:`parallax_compile.hf.saving`).
"""

from __future__ import annotations

import datetime
import importlib
import inspect
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import fx
from torch.utils import _pytree as pytree

from . import __version__
from .checks import is_probe, outputs_error, tensor_digests, weights_digest
from .conversion_dir import (FORMAT_VERSION, MANIFEST_FILE, REFERENCE_FILE, check_output, read_manifest,
                             record_weights, warn_unrecorded, weight_problems, write_atomically)
from .convert import ConversionInfo
from .passes.capture import unlift
from .reference import parallax_attention_ref

__all__ = ["save", "load", "verify", "VerifyReport"]

MODEL_FILE, REPORT_FILE = "model.pt2", MANIFEST_FILE
# Relative RMS error of the op against the float64 reference (SPEC section 5).
OP_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass
class _GraphRecord:
    """What a graph conversion directory needs besides the module: from :func:`convert`'s
    ``ConversionInfo`` or from the manifest of the directory the module was loaded from."""

    args: tuple
    kwargs: dict
    outputs: list
    dynamic_shapes: object
    manifest: dict
    conversion_digests: dict
    earlier_trained: list
    loaded_from: str | None = None


def _encode_shapes(shapes):
    """``dynamic_shapes`` (dicts / tuples of ``{dim: Dim.AUTO}``) as JSON."""
    if shapes is None:
        return None
    if isinstance(shapes, dict):
        return {"dict": [[k, _encode_shapes(v)] for k, v in shapes.items()]}
    if isinstance(shapes, (tuple, list)):
        return {"tuple": [_encode_shapes(v) for v in shapes]}
    return "auto"


def _decode_shapes(data):
    if data is None:
        return None
    if data == "auto":
        return torch.export.Dim.AUTO
    if "dict" in data:
        return {k: _decode_shapes(v) for k, v in data["dict"]}
    return tuple(_decode_shapes(v) for v in data["tuple"])


def dynamic_dims_of(shapes) -> dict[str, list[int]]:
    """``{input: [dynamic dims]}`` of a ``dynamic_shapes`` spec (top-level inputs; ``{}``: static)."""
    out = {}
    for name, spec in (shapes or {}).items() if isinstance(shapes, dict) else ():
        if isinstance(spec, dict) and all(isinstance(k, int) for k in spec):
            out[str(name)] = sorted(spec)
        elif isinstance(spec, dict):
            out |= {f"{name}.{k}": d for k, d in dynamic_dims_of(spec).items()}
    return out


def _shapes_from_program(ep, gm) -> dict | None:
    """Dynamic dims of a program saved before the manifest recorded them: the symbolic dims of its
    user inputs, by the loaded module's parameter names."""
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"
            and n.name in set(ep.graph_signature.user_inputs)}
    shapes = {}
    for name in inspect.signature(gm.forward).parameters:
        v = vals.get(name)
        dims = [d for d in range(v.dim()) if not isinstance(v.shape[d], int)] if isinstance(v, torch.Tensor) else []
        shapes[name] = {d: torch.export.Dim.AUTO for d in dims} or None
    return shapes if any(shapes.values()) else None


def _record(module: fx.GraphModule) -> _GraphRecord:
    meta = getattr(module, "meta", {})
    info: ConversionInfo | None = meta.get("parallax")
    if info is not None:
        outs = pytree.tree_leaves(info.reference_outputs)
        manifest = {"source": None, "dynamic": info.dynamic, "capture_note": info.note,
                    "max_output_error": info.max_output_error, "sites": [s.as_dict() for s in info.sites]}
        return _GraphRecord(info.example_args, info.example_kwargs, outs, info.dynamic_shapes, manifest,
                            info.digests, [])
    report, reference = meta.get("parallax_report"), meta.get("parallax_reference")
    if report is None or reference is None:
        raise ValueError("save: `model` is not a converted model (no module.meta['parallax']); pass the module "
                         "returned by parallax_compile.convert or parallax_compile.load, or an upgraded "
                         "Hugging Face model")
    args, kwargs, outputs, shapes = reference
    conversion = report.get("conversion_digests")
    if conversion is None:  # format 1: one digest of all non-probe weights
        unchanged = report.get("weights_digest") == weights_digest(module)
        conversion = {n: d for n, d in tensor_digests(module).items() if not is_probe(n)} if unchanged else {}
    keep = ("source", "dynamic", "capture_note", "max_output_error", "sites", "lla_output_error",
            "lla_output_error_zero")
    return _GraphRecord(args, kwargs, outputs, shapes, {k: report[k] for k in keep if k in report}, conversion,
                        list(report.get("trained", [])), meta.get("parallax_loaded_from"))


def exported_program(module: fx.GraphModule) -> torch.export.ExportedProgram:
    """``torch.export`` of a converted module (from :func:`~parallax_compile.convert` or
    :func:`load`) on its example inputs, with the conversion's dynamic dims (what :func:`save`
    writes and the exporters in :mod:`parallax_compile.export` read)."""
    rec = _record(module)
    return torch.export.export(module, rec.args, rec.kwargs, dynamic_shapes=rec.dynamic_shapes, strict=False)


def _is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


def save(model, directory: str | Path, *, source: str | None = None, trained: bool = False,
         overwrite: bool = False) -> Path:
    """Write a converted model to the conversion directory ``directory``; returns it.

    ``model``: the module from :func:`~parallax_compile.convert` or :func:`load` (graph kind), or
    an upgraded / loaded Hugging Face model (:func:`parallax_compile.hf.save_hf`), trained or not.
    ``trained=True`` records that non-probe weights were fine-tuned (probes are always free to
    train); without it, a non-probe weight that changed since conversion is kept at its
    conversion digest, so ``verify`` fails naming it (and a warning says so).

    Writes to a temporary sibling renamed into place (an interrupted save leaves nothing that looks
    valid). Raises :class:`~parallax_compile.conversion_dir.OutputNotAllowed` for a non-empty
    ``directory`` that is not an earlier, untrained conversion of the same model (nor the one
    ``model`` was loaded from) unless ``overwrite=True``; ``ValueError`` for a module that is not a
    conversion."""
    if _is_hf(model):
        from .hf.saving import save_hf

        return save_hf(model, directory, source=source, trained=trained, overwrite=overwrite)
    rec = _record(model)
    source = source if source is not None else rec.manifest.get("source")
    current = tensor_digests(model)
    manifest = {"format_version": FORMAT_VERSION, "kind": "graph"}
    unrecorded = record_weights(manifest, current, rec.conversion_digests, trained=trained,
                                earlier_trained=rec.earlier_trained)
    check_output(directory, source=source, model_id=manifest["model_digest"], loaded_from=rec.loaded_from,
                 overwrite=overwrite)
    warn_unrecorded(unrecorded, "save with pc.save(..., trained=True)")
    leaves, spec = pytree.tree_flatten((rec.args, rec.kwargs))
    tensors = {f"input.{i}": t.contiguous() for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)}
    constants = {str(i): t for i, t in enumerate(leaves) if not isinstance(t, torch.Tensor)}
    tensors |= {f"output.{i}": t.detach().contiguous() for i, t in enumerate(rec.outputs)
                if isinstance(t, torch.Tensor)}
    manifest |= {
        "parallax_compile": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **rec.manifest,
        "source": source,
        "dynamic_shapes": _encode_shapes(rec.dynamic_shapes),
        "dynamic_dims": dynamic_dims_of(rec.dynamic_shapes),
        "inputs_spec": pytree.treespec_dumps(spec),
        "input_constants": constants,
        "num_outputs": len(rec.outputs),
        "pytree_modules": _pytree_modules(model),
    }
    program = torch.export.export(model, rec.args, rec.kwargs, dynamic_shapes=rec.dynamic_shapes, strict=False)
    with write_atomically(directory) as tmp:
        torch.export.save(program, tmp / MODEL_FILE)
        save_file(tensors, tmp / REFERENCE_FILE)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    return Path(directory)


def _pytree_modules(module: fx.GraphModule) -> list[str]:
    """Modules defining the container types of the inputs/outputs (e.g. a transformers
    ``ModelOutput``): they must be imported before ``torch.export.load`` can rebuild the spec."""
    found = set()

    def walk(spec):
        if spec is None:
            return
        t = getattr(spec, "type", None)
        if t is not None and getattr(t, "__module__", "builtins") not in ("builtins", "collections"):
            found.add(t.__module__)
        children = spec.children() if callable(getattr(spec, "children", None)) else getattr(spec, "children_specs", [])
        for child in children or []:  # torch >= 2.13: children(); older: the children_specs list
            walk(child)

    walk(getattr(module, "_out_spec", None))
    walk(getattr(module, "_in_spec", None))
    return sorted(found)


def _retie(gm: fx.GraphModule) -> None:
    """Parameters that shared one tensor before saving (tied embeddings) come back as separate
    Parameter objects over one storage; make them one object again so an optimizer sees it once."""
    first: dict[tuple, torch.nn.Parameter] = {}
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        key = (p.data_ptr(), tuple(p.shape), tuple(p.stride()), p.dtype)
        if key not in first:
            first[key] = p
        elif first[key] is not p:
            owner, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, attr, first[key])


def _read(directory: Path) -> tuple[dict, tuple, dict, list]:
    """``(manifest, example args, example kwargs, original outputs)`` of a graph conversion directory."""
    report = read_manifest(directory)
    tensors = load_file(directory / REFERENCE_FILE)
    spec = pytree.treespec_loads(report["inputs_spec"])
    leaves = [tensors.get(f"input.{i}", report["input_constants"].get(str(i))) for i in range(spec.num_leaves)]
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    outputs = [tensors.get(f"output.{i}") for i in range(report["num_outputs"])]
    return report, args, kwargs, outputs


def load_graph(directory: str | Path) -> fx.GraphModule:
    """Load a graph conversion directory: a trainable ``GraphModule`` whose ``meta["parallax_report"]``
    holds the manifest (a dict); :func:`save` takes it back after training."""
    directory = Path(directory)
    for name in (MODEL_FILE, REPORT_FILE, REFERENCE_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} is not a saved conversion: {name} is missing")
    report, args, kwargs, outputs = _read(directory)
    for name in report.get("pytree_modules", []):
        importlib.import_module(name)  # registers e.g. transformers' ModelOutput pytree nodes
    ep = torch.export.load(directory / MODEL_FILE)
    gm = unlift(ep)
    _retie(gm)
    shapes = (_decode_shapes(report["dynamic_shapes"]) if "dynamic_shapes" in report
              else _shapes_from_program(ep, gm))
    gm.meta["parallax_report"] = report
    gm.meta["parallax_reference"] = (args, kwargs, outputs, shapes)
    gm.meta["parallax_loaded_from"] = str(directory.resolve())
    return gm


def load(directory: str | Path, **kwargs):
    """Load any conversion directory (the one loader): a graph conversion as a trainable
    ``GraphModule`` (``meta["parallax_report"]``: the manifest), a Hugging Face conversion as its
    transformers model with the probes (``kwargs`` go to ``from_pretrained``: ``dtype``,
    ``device_map``...). Raises ``FileNotFoundError`` for a directory that is not a conversion."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    kind = read_manifest(directory)["kind"]
    if kind == "huggingface":
        from .hf.auto import load_pretrained

        return load_pretrained(directory, **kwargs)
    if kwargs:
        raise TypeError(f"load: a graph conversion takes no keyword arguments, got {sorted(kwargs)}")
    return load_graph(directory)


@dataclass
class VerifyReport:
    """Result of :func:`verify`."""

    ok: bool
    op_errors: list[dict] = field(default_factory=list)
    """Per Parallax node: relative RMS error of the op against the float64 reference."""
    output_error: float = math.nan
    """Max relative error of the outputs at ``r = 0`` (``r_gain = 0``) against the original model's outputs."""
    probe_norms: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Checks that did not apply, and why."""


class _OpChecker(fx.Interpreter):
    """Runs the module; at every Parallax node, also evaluates the float64 reference."""

    def __init__(self, gm):
        super().__init__(gm)
        self.errors: list[dict] = []

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target is torch.ops.parallax.attention.default:
            q, r, k, v, mask, scale, causal, window = (list(args) + [None] * 8)[:8]
            up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            ref = parallax_attention_ref(up(q), up(r), up(k), up(v), scale=scale, causal=bool(causal),
                                         window_size=window, attn_mask=up(mask))
            err = ((out[0].double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            self.errors.append({"node": self.current_node.name if hasattr(self, "current_node") else "",
                                "dtype": str(q.dtype), "error": err, "tolerance": OP_TOLERANCE[q.dtype]})
        return out

    def run_node(self, n):
        self.current_node = n
        return super().run_node(n)


def _check_outputs_at_zero_probe(gm, probes, args, kwargs, ref_outputs, result: VerifyReport) -> None:
    saved = {n: p.detach().clone() for n, p in probes.items()}
    with torch.no_grad():
        for p in probes.values():
            p.zero_()
        outs = pytree.tree_leaves(gm(*args, **kwargs))
        for n, p in probes.items():
            p.copy_(saved[n])
    pairs = [(a, b) for a, b in zip(outs, ref_outputs) if isinstance(b, torch.Tensor)]
    worst, ok = outputs_error([a for a, _ in pairs], [b for _, b in pairs])
    if not ok:
        result.problems.append(f"output differs from the original model at r = 0 (r_gain = 0) by {worst:.2e}")
    result.output_error = worst
    if len(outs) != len(ref_outputs):
        result.problems.append(f"{len(outs)} outputs, the original model had {len(ref_outputs)}")


def check_weights(model, manifest: dict, result: VerifyReport) -> bool:
    """Compare every tensor with the manifest's digests (problems); return whether non-probe
    weights were recorded as trained (the comparison at ``r = 0`` (``r_gain = 0``) then does not apply)."""
    problems, trained = weight_problems(manifest, tensor_digests(model))
    result.problems += problems
    if not manifest.get("digests") and manifest.get("weights_digest") and weights_digest(model) != manifest["weights_digest"]:
        trained = ["(format 1: non-probe weights changed)"]
    if trained:
        result.notes.append(f"{len(trained)} non-probe tensor(s) recorded as trained since conversion (fine-tuning): "
                            "the comparison with the original model's outputs at r = 0 (r_gain = 0) does not apply; skipped")
    return bool(trained)


def verify(directory: str | Path) -> VerifyReport:
    """Re-check any conversion directory, without the original model:

    0. every tensor equals the manifest's digest (a weight edited after saving, or changed without
       recording training, fails);
    1. with the saved probes, every Parallax node's output equals the float64 reference
       (:func:`~parallax_compile.reference.parallax_attention_ref`) within SPEC section 5;
    2. with every probe set to zero, the outputs equal the original model's saved outputs
       (fp32: max error <= 1e-5 relative to the output's scale) -- unless the manifest records
       non-probe weights as trained (full fine-tuning): then ``notes`` says the check does not apply.
       A Hugging Face directory just outside the fp32 tolerance is accepted when the model at
       ``r = 0`` is no farther than the saved outputs from the original model run in float64
       (:func:`~parallax_compile.checks.within_fp32_rounding`; the probes removed give back the
       original). A graph directory has no original model to run, so its check is the bare tolerance.
    """
    directory = Path(directory)
    if read_manifest(directory)["kind"] == "huggingface":
        from .hf.saving import verify_hf

        return verify_hf(directory)
    gm = load_graph(directory)
    report, args, kwargs, ref_outputs = _read(directory)
    result = VerifyReport(ok=True)
    probes = {n: p for n, p in gm.named_parameters() if is_probe(n)}
    result.probe_norms = {n: p.detach().norm().item() for n, p in probes.items()}
    checker = _OpChecker(gm)
    with torch.no_grad():
        checker.run(*pytree.tree_leaves((args, kwargs)))
    result.op_errors = checker.errors
    for e in checker.errors:
        if not e["error"] <= e["tolerance"]:
            result.problems.append(f"Parallax node {e['node']}: error {e['error']:.2e} > {e['tolerance']:.0e}")
    if check_weights(gm, report, result):
        pass
    elif any(site.get("fit") and site.get("rewritable") for site in report.get("sites", [])):
        # LLA sites were converted approximately: at W_R = 0 they compute softmax, not LLA.
        result.notes.append("approximate LLA conversion (see the sites' fit report): r = 0 gives softmax "
                            "attention at those sites, not the original LLA; the comparison does not apply; skipped")
    else:
        _check_outputs_at_zero_probe(gm, probes, args, kwargs, ref_outputs, result)
    if not checker.errors:
        result.problems.append("the saved model contains no Parallax node")
    result.ok = not result.problems
    return result
