"""The conversion directory: one manifest for every kind of saved conversion, and safe writing.

A conversion directory holds ``parallax.json`` (the manifest) and ``reference.safetensors`` (the
example inputs and the *original* model's outputs on them), plus what its ``kind`` needs:

* ``"graph"``: ``model.pt2``, the converted program (:mod:`parallax_compile.saving`);
* ``"huggingface"``: a transformers model directory (``config.json``, ``model.safetensors``, the
  tokenizer) whose class carries the probes (:mod:`parallax_compile.hf.auto`).

The manifest says (``format_version`` 2): ``kind``; ``source`` (the model spec it came from);
``sites`` (found, rewritten, skipped and why); ``dynamic_dims`` (which input dims may vary);
``digests`` (per tensor of the state dict, probes included, a digest of dtype, shape and bytes as
last saved); ``conversion_digests`` (the non-probe tensors' digests at conversion); ``trained``
(the tensors recorded as trained since conversion). ``verify`` fails on any tensor that differs
from ``digests``; a non-probe tensor that differs from ``conversion_digests`` and is not in
``trained`` cannot be saved as such (it is kept at its conversion digest, so verify names it).

Writing (:func:`write_atomically`) goes to a temporary sibling directory renamed into place at the
end, so an interrupted save leaves the previous directory (or none), never a half-written one.
:func:`check_output` refuses a non-empty directory that is not an earlier, untrained conversion of
the same model unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

from .checks import is_probe

__all__ = ["FORMAT_VERSION", "KINDS", "MANIFEST_FILE", "REFERENCE_FILE", "OutputNotAllowed", "check_output",
           "is_conversion_dir", "model_digest", "read_manifest", "record_weights", "weight_problems",
           "write_atomically"]

FORMAT_VERSION = 2
KINDS = ("graph", "huggingface")
MANIFEST_FILE, REFERENCE_FILE = "parallax.json", "reference.safetensors"


class OutputNotAllowed(FileExistsError):
    """The output directory holds something a save would destroy (or cannot be written)."""


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a conversion directory, with ``kind`` filled in for directories written
    before format version 2 (graph: no ``kind``; Hugging Face: ``"format": "hf"``).
    Raises ``FileNotFoundError`` (no manifest) or ``ValueError`` (not a manifest)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        if (Path(directory) / ".metadata").is_file():  # torch.distributed.checkpoint's own file
            raise FileNotFoundError(
                f"{directory} is a training checkpoint (DCP), not a conversion directory: write one with "
                "parallax_compile.distributed.checkpoint_to_conversion(checkpoint, base_dir, out_dir) "
                "(or examples/train_distributed.py --export DIR)")
        raise FileNotFoundError(f"{directory} is not a conversion directory: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not a parallax-compile manifest ({e})") from None
    if not isinstance(manifest, dict) or not ("sites" in manifest or "kind" in manifest):
        raise ValueError(f"{path} is not a parallax-compile manifest (no `kind` or `sites`)")
    if "kind" not in manifest:
        manifest["kind"] = "huggingface" if manifest.get("format") == "hf" else "graph"
    if manifest["kind"] not in KINDS:
        raise ValueError(f"{path}: unknown kind {manifest['kind']!r}; expected one of {KINDS}")
    manifest.setdefault("digests", {})
    manifest.setdefault("trained", [])
    return manifest


def is_conversion_dir(directory: str | Path) -> bool:
    """Whether ``directory`` has a readable manifest."""
    try:
        read_manifest(directory)
    except (OSError, ValueError):
        return False
    return True


def model_digest(conversion_digests: dict[str, str]) -> str:
    """One digest of the non-probe tensors at conversion: the identity of the original model."""
    h = hashlib.sha256()
    for name in sorted(conversion_digests):
        if not is_probe(name):
            h.update(f"{name}={conversion_digests[name]};".encode())
    return h.hexdigest()[:32]


def record_weights(manifest: dict, current: dict[str, str], conversion: dict[str, str], *, trained: bool,
                   earlier_trained=()) -> list[str]:
    """Fill ``digests``, ``conversion_digests``, ``model_digest`` and ``trained`` of ``manifest``.

    ``current``: digests of the tensors being saved; ``conversion``: the digests at conversion
    (non-probe tensors; probes are free to train). Probes that changed are recorded as trained;
    other changed tensors only with ``trained=True`` -- otherwise they keep their conversion digest
    (``verify`` then fails naming them) and their names are returned (the caller warns)."""
    conv = {n: d for n, d in conversion.items() if not is_probe(n)}
    digests, trained_names, unrecorded = {}, set(earlier_trained), []
    for name, d in current.items():
        before = conv.get(name)
        if is_probe(name) or before is None or d == before:
            digests[name] = d
            if is_probe(name) and name in conversion and d != conversion[name]:
                trained_names.add(name)
        elif trained or name in trained_names:
            digests[name] = d
            trained_names.add(name)
        else:
            digests[name] = before
            unrecorded.append(name)
    manifest["digests"] = digests
    manifest["conversion_digests"] = conv
    manifest["model_digest"] = model_digest(conv)
    manifest["trained"] = sorted(trained_names & set(current))
    return unrecorded


def warn_unrecorded(names: list[str], how: str) -> None:
    if names:
        warnings.warn(f"{len(names)} non-probe tensor(s) changed since conversion but training was not recorded "
                      f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): `verify` will fail; "
                      f"{how} to record fine-tuning", stacklevel=3)


def weight_problems(manifest: dict, current: dict[str, str]) -> tuple[list[str], list[str]]:
    """``(problems, trained non-probe tensors)``: every tensor whose digest differs from the
    manifest's (or is missing / extra) is a problem; a manifest without digests (format 1) gives
    none."""
    recorded = manifest.get("digests") or {}
    if not recorded:
        return [], []
    changed = sorted(n for n in recorded.keys() & current.keys() if recorded[n] != current[n])
    missing = sorted(recorded.keys() - current.keys())
    extra = sorted(current.keys() - recorded.keys())
    problems = []
    for label, names in (("differ from the recorded digest", changed), ("are missing", missing),
                         ("are not in the manifest", extra)):
        if names:
            problems.append(f"{len(names)} tensor(s) {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                            + ("; a weight changed after saving, or was edited without recording training "
                               "(pc.save(..., trained=True))" if label.startswith("differ") else ""))
    trained = [n for n in manifest.get("trained", []) if not is_probe(n)]
    return problems, trained


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(directory: str | Path, *, source: str | None = None, model_id: str | None = None,
                 loaded_from: str | Path | None = None, overwrite: bool = False) -> None:
    """Raise :class:`OutputNotAllowed` (one line) unless a conversion may be written to ``directory``:
    it must be absent, empty, an earlier conversion of the same model (same ``source`` spec, or
    same ``model_id`` from :func:`model_digest`) that records no training, or the directory the
    model was loaded from (``loaded_from``); ``overwrite=True`` lifts that. Its parent must be
    writable (checked before any conversion work)."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise OutputNotAllowed(f"output {out} exists and is not a directory")
    anchor = _first_existing(out.parent.resolve())
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputNotAllowed(f"output {out}: {anchor} is not a writable directory")
    if not out.exists() or not any(out.iterdir()) or overwrite:
        return
    if loaded_from is not None and Path(loaded_from).resolve() == out.resolve():
        return
    try:
        manifest = read_manifest(out)
    except (OSError, ValueError):
        raise OutputNotAllowed(f"output {out} is not empty and is not a conversion directory; "
                               "pass --overwrite (overwrite=True) to replace it") from None
    same = (source is not None and manifest.get("source") == source) or (
        model_id is not None and manifest.get("model_digest") == model_id)
    if not same:
        raise OutputNotAllowed(f"output {out} holds another conversion (source: {manifest.get('source') or 'unknown'}); "
                               "pass --overwrite (overwrite=True) to replace it")
    if manifest.get("trained"):
        raise OutputNotAllowed(f"output {out} holds a fine-tuned conversion ({len(manifest['trained'])} trained "
                               "tensor(s)); pass --overwrite (overwrite=True) to replace it")


@contextlib.contextmanager
def write_atomically(directory: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``directory``; when the block succeeds, it replaces
    ``directory`` (the old one is removed only after the new one is in place); when it fails, it
    is removed and ``directory`` is left as it was."""
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{tag}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
