"""Ascend NPU backend through torch_npu, imported lazily.

torch_npu needs Ascend's CANN toolkit; installed without it, its import fails (and its autoload
entry point can even break ``import torch`` unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``). So the
import happens only when someone asks about the npu, and any failure becomes the reason string of
"npu unavailable: <reason>" instead of an exception at ``import npu_ft``.

A PrivateUse1 backend already renamed to "npu" whose module is registered as ``torch.npu`` (the
test suite's fake npu device does this) is used as it is, without importing torch_npu.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ._accelerator import AcceleratorBackend


def _registered_npu_module() -> ModuleType | None:
    """``torch.npu`` when a PrivateUse1 backend named "npu" is already registered."""
    if torch._C._get_privateuse1_backend_name() != "npu":
        return None
    return getattr(torch, "npu", None)


class NpuBackend(AcceleratorBackend):
    name = "npu"
    dist_backend = "hccl"

    def __init__(self) -> None:
        self._module: ModuleType | None = None
        self._reason: str | None = None
        self._probed = False

    def _probe(self) -> None:
        if self._probed:
            return
        self._probed = True
        module = _registered_npu_module()
        if module is None:
            try:
                importlib.import_module("torch_npu")
            except Exception as exc:  # noqa: BLE001 - any failure means "unavailable", with why
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self._reason = f"torch_npu could not be imported ({type(exc).__name__}: {first_line})"
                return
            module = _registered_npu_module()
            if module is None:
                self._reason = "torch_npu imported but registered no 'npu' device module"
                return
        try:
            available = bool(module.is_available())
        except Exception as exc:  # noqa: BLE001
            self._reason = f"torch.npu.is_available() failed ({type(exc).__name__}: {exc})"
            return
        if not available:
            self._reason = "no NPU device visible (check CANN, the driver and ASCEND_RT_VISIBLE_DEVICES)"
            return
        self._module = module

    def runtime(self) -> ModuleType:
        self.require()
        assert self._module is not None
        return self._module

    def unavailable_reason(self) -> str | None:
        self._probe()
        return self._reason

    def reprobe(self) -> None:
        """Forget the cached probe (after a backend was registered at run time, e.g. in tests)."""
        self._module, self._reason, self._probed = None, None, False
