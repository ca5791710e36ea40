"""Find the op modules of a backend package and call their ``register()``."""

from __future__ import annotations

import importlib
import pkgutil


def register_submodules(package_name: str) -> list[str]:
    """Import each submodule of ``package_name`` and call its ``register()``; returns their names."""
    package = importlib.import_module(package_name)
    names = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register()
            names.append(info.name)
    return names
