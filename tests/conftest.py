"""Test-session settings.

* Every cache a test run writes goes under ``$PARALLAX_COMPILE_CACHE`` (default
  ``~/.cache/parallax-compile``), like the package's own (Gemma 3 270M, Gutenberg text): Triton's
  and Inductor's compile caches, Hugging Face's module cache, matplotlib's config. A variable the
  user set already is kept.
* The default run deselects ``slow`` tests (``addopts = -m "not slow"`` in pyproject.toml);
  ``.ci/run`` runs them in a second invocation, ``pytest -m slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

_CACHE = Path(os.environ.get("PARALLAX_COMPILE_CACHE") or "~/.cache/parallax-compile").expanduser()
for _var, _sub in {
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TORCH_EXTENSIONS_DIR": "torch_extensions",
    "HF_HOME": "huggingface",
    "MPLCONFIGDIR": "matplotlib",
}.items():
    os.environ.setdefault(_var, str(_CACHE / _sub))
