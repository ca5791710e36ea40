"""The import hook behind ``NPU_FT_LLAMAFACTORY=1``.

``npu-ft lf-train --install-hook`` writes ``npu_ft_llamafactory.pth`` into this Python's
site-packages (the plugin package itself is importable because it is installed). Python runs its
import line at every start-up; it costs one environment lookup and does nothing unless
``NPU_FT_LLAMAFACTORY`` is set. When it is, :func:`install_import_hook` puts a finder on
``sys.meta_path`` (importing nothing heavy) that waits for ``llamafactory.model.loader`` to be
imported (by ``llamafactory-cli``, its torchrun workers, the web UI, a script...); then, if
``NPU_FT_LLAMAFACTORY`` is 1/true/yes/on, it runs
:func:`~npu_ft_llamafactory.apply_npu_ft_to_llamafactory` with the options of the ``NPU_FT_LF_*``
variables (:func:`~npu_ft_llamafactory.options.options_from_env`) -- so every process of a run is
patched, not only the first one. A bad value ends the process with one line naming the variable.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import site
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .options import PluginOptions

__all__ = ["PTH_NAME", "hook_status", "install_import_hook", "install_pth", "pth_path", "uninstall_pth"]

PTH_NAME = "npu_ft_llamafactory.pth"
TARGET = "llamafactory.model.loader"


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``llamafactory.model.loader`` through the other finders, then patches after exec."""

    def __init__(self, options: PluginOptions | None):
        self._spec = None
        self.options = options

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                self._spec = spec
                return importlib.util.spec_from_loader(fullname, self, origin=spec.origin)
        return None

    def create_module(self, spec):
        return self._spec.loader.create_module(self._spec)

    def exec_module(self, module):
        # keep the real spec/loader on the module (tracebacks, reload, inspect)
        module.__spec__ = self._spec
        module.__loader__ = self._spec.loader
        module.__file__ = self._spec.origin
        self._spec.loader.exec_module(module)
        sys.modules[TARGET] = module
        _apply(self.options)


def _options_from_env() -> PluginOptions | None:
    """The options the environment asks for; None if ``NPU_FT_LLAMAFACTORY`` is off. A bad value
    ends the process with one line (this runs inside someone else's import)."""
    from .options import NpuFtLlamaFactoryError, hook_enabled_from_env, options_from_env

    try:
        return options_from_env() if hook_enabled_from_env() else None
    except NpuFtLlamaFactoryError as exc:
        raise SystemExit(f"npu-ft LLaMA-Factory import hook: {exc}") from None


def _apply(options: PluginOptions | None) -> None:
    options = options if options is not None else _options_from_env()
    if options is None:
        return
    from .lf_patch import apply_npu_ft_to_llamafactory, startup_line

    info = apply_npu_ft_to_llamafactory(**options.as_kwargs())
    if info.get("patched") and os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        print(startup_line(info), file=sys.stderr)


def install_import_hook(options: PluginOptions | None = None) -> bool:
    """Patch LLaMA-Factory when it is imported (or now, if it already is). Idempotent.

    ``options``: what to patch with; None (the ``.pth`` hook) = read ``NPU_FT_LLAMAFACTORY`` and the
    ``NPU_FT_LF_*`` variables at that moment (nothing is patched if ``NPU_FT_LLAMAFACTORY`` is off).
    """
    if TARGET in sys.modules:
        _apply(options)
        return True
    finder = next((f for f in sys.meta_path if isinstance(f, _PatchAfterImport)), None)
    if finder is None:
        sys.meta_path.insert(0, _PatchAfterImport(options))
    else:
        finder.options = options
    return True


# --------------------------------------------------------------------------------------------------
# the .pth file
# --------------------------------------------------------------------------------------------------

# cheap at every start-up: whether NPU_FT_LLAMAFACTORY is on is decided (npu_ft.envflags) when
# LLaMA-Factory's loader is imported
_PTH_IMPORT = ("import os; os.environ.get('NPU_FT_LLAMAFACTORY', '').strip() "
               "and __import__('npu_ft_llamafactory.hook').hook.install_import_hook()")


def _default_site_dir() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def pth_path(site_dir: str | os.PathLike | None = None) -> Path:
    return (Path(site_dir) if site_dir else _default_site_dir()) / PTH_NAME


def install_pth(site_dir: str | os.PathLike | None = None) -> Path:
    """Write the ``.pth`` file (the guarded import line); returns its path."""
    path = pth_path(site_dir)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(f"{_PTH_IMPORT}\n")
    os.replace(staging, path)
    return path


def uninstall_pth(site_dir: str | os.PathLike | None = None) -> Path | None:
    path = pth_path(site_dir)
    if path.exists():
        path.unlink()
        return path
    return None


def hook_status() -> dict:
    """Where the ``.pth`` file is (if anywhere on this Python's site dirs) and whether it is active."""
    dirs = list(dict.fromkeys([str(_default_site_dir()), *site.getsitepackages(), site.getusersitepackages()]))
    found = [str(Path(d) / PTH_NAME) for d in dirs if (Path(d) / PTH_NAME).exists()]
    return {"installed": found, "enabled_by_env": os.environ.get("NPU_FT_LLAMAFACTORY", ""),
            "active_in_this_process": any(isinstance(f, _PatchAfterImport) for f in sys.meta_path)}
