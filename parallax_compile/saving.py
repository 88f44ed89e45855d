"""Save, load and re-verify a converted model.

A saved conversion is a directory:

* ``model.pt2``: the converted program (``torch.export.save``); every Parallax site is one
  ``parallax.attention`` node, so ``import parallax_compile`` before loading;
* ``parallax.json``: the report (sites found, rewritten, skipped and why), versions, source;
* ``reference.safetensors``: the example inputs and the **original** model's outputs on them,
  so ``verify`` can prove, without the original model, that the saved model at ``W_R = 0`` is
  still that model.
"""

from __future__ import annotations

import datetime
import importlib
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
from .convert import TOLERANCE, ConversionInfo, is_probe, relative_error, weights_digest
from .passes.capture import unlift
from .reference import parallax_attention_ref

__all__ = ["save", "load", "verify", "VerifyReport"]

FORMAT_VERSION = 1
MODEL_FILE, REPORT_FILE, REFERENCE_FILE = "model.pt2", "parallax.json", "reference.safetensors"
# Relative RMS error of the op against the float64 reference (SPEC section 5).
OP_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _info(module: fx.GraphModule) -> ConversionInfo:
    info = getattr(module, "meta", {}).get("parallax")
    if info is None:
        raise ValueError("save: `module` is not a converted model (no module.meta['parallax']); "
                         "pass the module returned by parallax_compile.convert")
    return info


def exported_program(module: fx.GraphModule) -> torch.export.ExportedProgram:
    """``torch.export`` of a converted module on its example inputs, with the conversion's
    dynamic dims (what :func:`save` writes and the exporters in :mod:`parallax_compile.export` read)."""
    info = _info(module)
    return torch.export.export(module, info.example_args, info.example_kwargs,
                               dynamic_shapes=info.dynamic_shapes, strict=False)


def save(module: fx.GraphModule, directory: str | Path, *, source: str | None = None) -> Path:
    """Write a converted module to ``directory`` (created if needed). Returns the directory."""
    info = _info(module)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(exported_program(module), out / MODEL_FILE)
    leaves, spec = pytree.tree_flatten((info.example_args, info.example_kwargs))
    tensors = {f"input.{i}": t.contiguous() for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)}
    constants = {str(i): t for i, t in enumerate(leaves) if not isinstance(t, torch.Tensor)}
    outs = pytree.tree_leaves(info.reference_outputs)
    tensors |= {f"output.{i}": t.detach().contiguous() for i, t in enumerate(outs) if isinstance(t, torch.Tensor)}
    save_file(tensors, out / REFERENCE_FILE)
    report = {
        "format_version": FORMAT_VERSION,
        "parallax_compile": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "dynamic_shapes": info.dynamic,
        "capture_note": info.note,
        "max_output_error": info.max_output_error,
        "inputs_spec": pytree.treespec_dumps(spec),
        "input_constants": constants,
        "num_outputs": len(outs),
        "pytree_modules": _pytree_modules(module),
        "weights_digest": info.weights_digest,
        "sites": [s.as_dict() for s in info.sites],
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return out


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
    report = json.loads((directory / REPORT_FILE).read_text())
    tensors = load_file(directory / REFERENCE_FILE)
    spec = pytree.treespec_loads(report["inputs_spec"])
    leaves = [tensors.get(f"input.{i}", report["input_constants"].get(str(i))) for i in range(spec.num_leaves)]
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    outputs = [tensors.get(f"output.{i}") for i in range(report["num_outputs"])]
    return report, args, kwargs, outputs


def load(directory: str | Path) -> fx.GraphModule:
    """Load a converted model saved by :func:`save`. Returns a trainable ``GraphModule`` whose
    ``meta["parallax"]`` holds the saved report (as a dict)."""
    directory = Path(directory)
    for name in (MODEL_FILE, REPORT_FILE, REFERENCE_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} is not a saved conversion: {name} is missing")
    report = json.loads((directory / REPORT_FILE).read_text())
    for name in report.get("pytree_modules", []):
        importlib.import_module(name)  # registers e.g. transformers' ModelOutput pytree nodes
    gm = unlift(torch.export.load(directory / MODEL_FILE))
    _retie(gm)
    gm.meta["parallax_report"] = report
    return gm


@dataclass
class VerifyReport:
    """Result of :func:`verify`."""

    ok: bool
    op_errors: list[dict] = field(default_factory=list)
    """Per Parallax node: relative RMS error of the op against the float64 reference."""
    output_error: float = math.nan
    """Max relative error of the outputs at ``W_R = 0`` against the original model's outputs."""
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
    worst = 0.0
    for new, ref in zip(outs, ref_outputs):
        if isinstance(ref, torch.Tensor) and ref.is_floating_point():
            err = relative_error(new, ref)
            worst = max(worst, err)
            if not err <= TOLERANCE.get(ref.dtype, 1e-5):
                result.problems.append(f"output differs from the original model at W_R = 0 by {err:.2e}")
    result.output_error = worst
    if len(outs) != len(ref_outputs):
        result.problems.append(f"{len(outs)} outputs, the original model had {len(ref_outputs)}")


def verify(directory: str | Path) -> VerifyReport:
    """Re-check a saved conversion, without the original model:

    1. with the saved probes, every Parallax node's output equals the float64 reference
       (:func:`~parallax_compile.reference.parallax_attention_ref`) within SPEC section 5;
    2. with every probe set to zero, the outputs equal the original model's saved outputs
       (fp32: max error <= 1e-5 relative to the output's scale) -- while the non-probe weights are
       those of the conversion (probes-only fine-tuning); after full fine-tuning this check does
       not apply and ``notes`` says so.
    """
    directory = Path(directory)
    gm = load(directory)
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
    if report.get("weights_digest") and weights_digest(gm) != report["weights_digest"]:
        # Other weights were fine-tuned after conversion: W_R = 0 no longer gives the original.
        result.notes.append("non-probe weights changed since conversion (full fine-tuning): the "
                            "comparison with the original model's outputs does not apply; skipped")
    elif any(site.get("fit") and site.get("rewritable") for site in report.get("sites", [])):
        # LLA sites were converted approximately: at W_R = 0 they compute softmax, not LLA.
        result.notes.append("approximate LLA conversion (see the sites' fit report): W_R = 0 gives softmax "
                            "attention at those sites, not the original LLA; the comparison does not apply; skipped")
    else:
        _check_outputs_at_zero_probe(gm, probes, args, kwargs, ref_outputs, result)
    if not checker.errors:
        result.problems.append("the saved model contains no Parallax node")
    result.ok = not result.problems
    return result

