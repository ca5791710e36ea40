"""Run a function once a module is imported (right away if it already is): how ``import npu_ft``
registers npu-ft's torch ops without importing torch itself (reading a recipe must stay torch-free).

A meta-path finder catches the first import of the module, lets the usual finders locate it, and
wraps its loader so that the function runs right after the module's code has run; the finder then
steps aside and the module keeps its own loader.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable
from importlib.machinery import ModuleSpec

_LOCK = threading.Lock()


def when_imported(name: str, callback: Callable[[], object]) -> None:
    """Call ``callback()`` once module ``name`` is imported: now if it is, else right after its import."""
    with _LOCK:
        if name not in sys.modules:
            sys.meta_path.insert(0, _PostImportFinder(name, callback))
            return
    callback()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, callback: Callable[[], object]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        with _LOCK:
            if self in sys.meta_path:
                sys.meta_path.remove(self)  # once; the other finders locate the module
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CallbackLoader(spec.loader, self.callback)
                return spec
        return None


class _CallbackLoader(importlib.abc.Loader):
    """The module's own loader, then the callback; the module is left with its own loader."""

    def __init__(self, loader, callback: Callable[[], object]) -> None:
        self.loader, self.callback = loader, callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.callback()
