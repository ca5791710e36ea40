"""Device layer: picks cpu, cuda or npu and answers every device question.

Selection order: an explicit name (argument, config ``device:``), else the ``NPU_FT_DEVICE`` env
var, else auto = npu > cuda > cpu. Asking explicitly for a device that cannot be used raises
:class:`DeviceUnavailableError` with the reason, e.g. "npu unavailable: torch_npu could not be
imported (...)"; a name that is no device at all (``NPU_FT_DEVICE=gpu``) raises
:class:`DeviceNameError` naming where it came from and the allowed values.

>>> from npu_ft.device import get_backend
>>> dev = get_backend("cpu")
>>> dev.torch_device(), dev.dist_backend
(device(type='cpu'), 'gloo')
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .base import DeviceBackend, DeviceNameError, DeviceUnavailableError, MemoryReading
from .cpu import CpuBackend
from .cuda import CudaBackend
from .npu import NpuBackend

ENV_VAR = "NPU_FT_DEVICE"
AUTO_ORDER = ("npu", "cuda", "cpu")

_BACKENDS: dict[str, DeviceBackend] = {"cpu": CpuBackend(), "cuda": CudaBackend(), "npu": NpuBackend()}

__all__ = [
    "AUTO_ORDER",
    "DeviceBackend",
    "DeviceNameError",
    "DeviceUnavailableError",
    "ENV_VAR",
    "MemoryReading",
    "all_backends",
    "backend_for_tensor",
    "device_name_from_env",
    "device_rng_runtimes",
    "get_backend",
    "select_device",
]


def all_backends() -> dict[str, DeviceBackend]:
    """Every known backend by name, available or not."""
    return dict(_BACKENDS)


def device_rng_runtimes() -> list[tuple[str, object]]:
    """``[(kind, module)]`` for every available accelerator whose generators a checkpoint saves
    (e.g. ``[("cuda", torch.cuda)]``); empty on a CPU-only machine."""
    found = []
    for name, backend in _BACKENDS.items():
        runtime = backend.rng_runtime()
        if runtime is not None:
            found.append((name, runtime))
    return found


def _kind(name: str) -> str:
    """``"NPU:1"`` -> ``"npu"``."""
    return name.strip().lower().split(":", 1)[0]


def _names() -> str:
    return ", ".join(["auto", *_BACKENDS])


def _lookup(name: str) -> DeviceBackend:
    key = _kind(name)
    if key == "auto":
        raise KeyError(key)
    try:
        return _BACKENDS[key]
    except KeyError:
        raise DeviceNameError(f"unknown device {name!r}: expected one of {_names()}") from None


def device_name_from_env(env: Mapping[str, str] | None = None) -> str:
    """``$NPU_FT_DEVICE`` (``"auto"`` when unset or empty), checked to name a device kind.

    Raises :class:`DeviceNameError` naming the variable and the allowed values.
    """
    value = (os.environ if env is None else env).get(ENV_VAR) or "auto"
    if _kind(value) != "auto" and _kind(value) not in _BACKENDS:
        raise DeviceNameError(f"{ENV_VAR}={value!r} is not a device: expected one of {_names()}")
    return value


def get_backend(name: str | None = None) -> DeviceBackend:
    """The backend for ``name`` ("cpu", "cuda", "npu", "auto" or None), checked to be usable.

    None means: the ``NPU_FT_DEVICE`` env var if set, else auto.
    """
    if name is None:
        name = device_name_from_env()
    if name.strip().lower() == "auto":
        for candidate in AUTO_ORDER:
            backend = _BACKENDS[candidate]
            if backend.is_available():
                return backend
        return _BACKENDS["cpu"]  # pragma: no cover - cpu is always available
    return _lookup(name).require()


def select_device(name: str | None = None, local_rank: int | None = None):
    """``(backend, torch.device)`` for this process: ``local_rank`` defaults to $LOCAL_RANK or 0."""
    backend = get_backend(name)
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return backend, backend.device_for_local_rank(local_rank)


def backend_for_tensor(tensor) -> DeviceBackend:
    """The backend that owns ``tensor``'s device (PrivateUse1 tensors belong to npu)."""
    kind = tensor.device.type
    if kind == "privateuseone":
        kind = "npu"
    return _lookup(kind)
