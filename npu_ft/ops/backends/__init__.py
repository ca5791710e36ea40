"""Per-device kernels. Each backend package exposes ``register()``, which registers its kernels
on its dispatch key; :func:`register_available_backends` calls it only for backends that can run
here (cpu always; cuda when a GPU and Triton are present; npu when torch_npu, or the test suite's
fake npu device, provides a usable "npu" device).

When: the cpu kernels at ``import npu_ft`` (no probe needed); cuda and npu, whose probes touch the
device (and may import torch_npu), on the first op call with a tensor on that device (through
:func:`register_for_device`, the registry's backend loader) or when
:func:`register_available_backends` is called (``npu-ft doctor``, ``npu_ft.ops.BACKEND_STATUS``)."""

from __future__ import annotations

import importlib
import logging

from .. import _registry

log = logging.getLogger(__name__)

_LOADED: set[str] = set()


def _cuda_reason() -> str | None:
    from npu_ft.device import all_backends

    reason = all_backends()["cuda"].unavailable_reason()
    if reason:
        return reason
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'npu-ft[triton]')"
    return None


def _npu_reason() -> str | None:
    from npu_ft.device import all_backends

    npu = all_backends()["npu"]
    npu.reprobe()
    return npu.unavailable_reason()


_REASONS = {"cpu": lambda: None, "cuda": _cuda_reason, "npu": _npu_reason}


def register_available_backends(names: tuple[str, ...] = tuple(_REASONS)) -> dict[str, str | None]:
    """Register the kernels of each usable backend in ``names`` (default: all) once.
    Returns {backend: None or why skipped}."""
    status: dict[str, str | None] = {}
    enabled = _registry.enabled_kernels()
    for name in names:
        reason_fn = _REASONS[name]
        if name in _LOADED:
            status[name] = None
            continue
        if name not in enabled:
            status[name] = "disabled by NPU_FT_KERNELS"
            continue
        reason = reason_fn()
        if reason is not None:
            status[name] = reason
            continue
        importlib.import_module(f"{__name__}.{name}").register()
        _LOADED.add(name)
        status[name] = None
        log.debug("registered %s kernels", name)
    return status


def register_for_device(device_type: str) -> bool:
    """Register the backend of ``device_type`` ("cuda", "npu") if it can run here; True if loaded."""
    if device_type not in _REASONS:
        return False
    return register_available_backends((device_type,))[device_type] is None


def loaded_backends() -> set[str]:
    return set(_LOADED)
