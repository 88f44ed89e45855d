"""Run a function once a module is imported (now, if it already is): how ``import parallax_compile``
registers its transformers integration without importing transformers itself."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings

__all__ = ["when_imported"]


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, hook):
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; the real finders do the work
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, hook = spec.loader.exec_module, self.hook

        def exec_then_hook(module):
            exec_module(module)
            try:
                hook()
            except Exception as e:  # noqa: BLE001 - never break the user's import
                warnings.warn(f"parallax_compile: could not register with {fullname}: {e}", stacklevel=2)

        spec.loader.exec_module = exec_then_hook
        return spec


def when_imported(name: str, hook) -> None:
    """Call ``hook()`` now if module ``name`` is imported, else right after its first import."""
    if name in sys.modules:
        hook()
    else:
        sys.meta_path.insert(0, _Finder(name, hook))
