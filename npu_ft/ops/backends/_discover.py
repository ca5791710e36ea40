"""Find the op modules of a backend package and register their kernel tables."""

from __future__ import annotations

import importlib
import pkgutil

from .. import _registry


def register_submodules(package_name: str) -> list[str]:
    """Import each public submodule of backend package ``package_name`` (e.g.
    ``npu_ft.ops.backends.cpu``) and register its ``KERNELS`` table ({op: kernel}) as that
    backend's kernels; returns the submodules' names."""
    package = importlib.import_module(package_name)
    backend = package_name.rsplit(".", 1)[-1]
    names = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        _registry.register_kernels(backend, module.KERNELS)
        names.append(info.name)
    return names
