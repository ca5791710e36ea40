"""Build (once per machine) and load npu-ft's native CPU kernels, the C++ files in ``npu_ft/csrc/cpu``.

The sources ship inside the package and are compiled on first use with torch's own JIT extension
builder (``torch.utils.cpp_extension.load``: the system C++ compiler and ninja, torch's headers
and flags). They register their primitives in the ``npu_ft_cpu`` op namespace
(``TORCH_LIBRARY_IMPL(npu_ft_cpu, CPU, m)``, threaded with ``at::parallel_for``); the Python
kernels in this package call them through :func:`native_ops`.

* Nothing is built at import: only the first call of a CPU kernel (or ``npu-ft doctor``) is.
* Cache: ``$TORCH_EXTENSIONS_DIR`` (default ``${NPU_FT_CACHE_DIR:-~/.cache/npu_ft}/torch_extensions``),
  one folder per build key (a hash of the sources, flags, torch and Python versions and machine),
  so a changed source or a new torch builds afresh and never loads a stale library.
* Concurrent processes: the first takes a file lock and builds, the others wait and load its result.
* Fallback: with no C++ compiler or ninja, a failing build, or ``NPU_FT_CPU_NATIVE=0``,
  :func:`native_ops` returns None (:func:`unavailable_reason` says why; logged once) and the kernels
  use their pure-torch paths.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV_NATIVE = "NPU_FT_CPU_NATIVE"
ENV_CACHE = "NPU_FT_CACHE_DIR"
NAMESPACE = "npu_ft_cpu"
SOURCE_DIR = Path(str(importlib.resources.files("npu_ft") / "csrc" / "cpu"))  # package data

# -O3 plus the flags that keep every float operation rounding exactly as torch's does (no fused
# multiply-add, no fast-math); OpenMP so at::parallel_for uses torch's intra-op threads.
_CFLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math")
_OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"ops": None, "error": None}


def disabled() -> bool:
    """True when ``NPU_FT_CPU_NATIVE`` turns the native kernels off (0 / false / no / off)."""
    return os.environ.get(ENV_NATIVE, "1").strip().lower() in ("0", "false", "no", "off")


def sources() -> list[Path]:
    """The C++ translation units of the extension (every ``*.cpp`` in ``npu_ft/csrc/cpu``)."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def build_key() -> str:
    """16 hex digits identifying one build: sources and headers, flags, torch, Python, machine."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*.cpp")) + sorted(SOURCE_DIR.glob("*.h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    compiler = os.environ.get("CXX", "c++")
    for part in (*_CFLAGS, *_OPENMP, compiler, torch.__version__, sys.version, platform.machine(), sys.platform):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    base = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "npu_ft")
    return Path(base) / "torch_extensions"


def _missing_tool() -> str | None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0]) is None:
        return f"no C++ compiler ({compiler!r} not found; install g++ or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    return None


def _load_or_build():
    """Load the library of the current build key, building it first if this machine has none."""
    name = f"{NAMESPACE}_{build_key()}"
    folder = cache_root() / name
    library, done = folder / f"{name}.so", folder / "complete"
    if not done.exists():
        import fcntl  # POSIX only: elsewhere the ImportError means "no native kernels"

        missing = _missing_tool()
        if missing:
            raise RuntimeError(missing)
        folder.mkdir(parents=True, exist_ok=True)
        with open(cache_root() / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process dies
            if not done.exists():
                _build(name, folder)
                done.write_text(f"{torch.__version__}\n")
    torch.ops.load_library(str(library))
    return getattr(torch.ops, NAMESPACE)


def _build(name: str, folder: Path) -> None:
    from torch.utils import cpp_extension

    # We hold the lock: a "lock" file of torch's own left by a killed build would block forever.
    (folder / "lock").unlink(missing_ok=True)
    log.warning("npu_ft: building the native CPU kernels into %s (once per machine and torch version)", folder)
    start = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[str(path) for path in sources()],
        extra_cflags=[*_CFLAGS, *_OPENMP],  # fresh lists: cpp_extension appends to them
        extra_ldflags=[*_OPENMP],
        build_directory=str(folder),
        is_python_module=False,
        verbose=os.environ.get("NPU_FT_CPU_NATIVE_VERBOSE", "") not in ("", "0"),
    )
    log.warning("npu_ft: native CPU kernels built in %.1f s", time.perf_counter() - start)


def native_ops():
    """The ``torch.ops.npu_ft_cpu`` namespace (building and loading it on first use), or None."""
    if disabled():
        return None
    if _STATE["ops"] is not None or _STATE["error"] is not None:
        return _STATE["ops"]
    with _LOCK:
        if _STATE["ops"] is None and _STATE["error"] is None:
            try:
                _STATE["ops"] = _load_or_build()
            except Exception as exc:  # noqa: BLE001 - no compiler, read-only cache, build error: use torch
                first = (str(exc).strip().splitlines() or [""])[0]
                _STATE["error"] = f"{type(exc).__name__}: {first}"
                log.warning("npu_ft: native CPU kernels unavailable, using torch ops (%s)", _STATE["error"])
                log.debug("native CPU kernel build error", exc_info=True)
    return _STATE["ops"]


def unavailable_reason() -> str | None:
    """Why :func:`native_ops` returns None (None when the native kernels are in use)."""
    if disabled():
        return f"disabled by {ENV_NATIVE}"
    native_ops()
    return _STATE["error"]
