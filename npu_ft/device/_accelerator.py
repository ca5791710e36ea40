"""Shared logic of the two accelerator backends (cuda, npu), which expose the same module API.

``torch.cuda`` and ``torch_npu``'s ``torch.npu`` both offer device_count / set_device /
synchronize / empty_cache / memory_allocated / max_memory_allocated / reset_peak_memory_stats /
manual_seed_all / get_device_name / is_bf16_supported. A backend subclass only says how to get
that module and why it might be unusable.
"""

from __future__ import annotations

import abc
from types import ModuleType

import torch

from .base import DeviceBackend, MemoryReading


class AcceleratorBackend(DeviceBackend):
    """A device whose runtime module follows the ``torch.cuda`` API."""

    @abc.abstractmethod
    def runtime(self) -> ModuleType:
        """The ``torch.cuda``-like module of this device (import it lazily here)."""

    def device_count(self) -> int:
        if not self.is_available():
            return 0
        return int(self.runtime().device_count())

    def set_device(self, device: torch.device) -> None:
        self.runtime().set_device(device)

    def total_memory_bytes(self) -> int | None:
        try:
            rt = self.runtime()
            return int(rt.get_device_properties(rt.current_device()).total_memory)
        except Exception:  # noqa: BLE001 - an unknown total only means no memory warning
            return None

    def supports_bf16(self) -> bool:
        fn = getattr(self.runtime(), "is_bf16_supported", None)
        return bool(fn()) if fn is not None else True

    def supports_fp16(self) -> bool:
        return True

    def device_name(self) -> str:
        try:
            return str(self.runtime().get_device_name())
        except Exception:  # noqa: BLE001 - a name is cosmetic; never fail a report over it
            return self.name

    def rng_runtime(self) -> ModuleType | None:
        return self.runtime() if self.is_available() else None

    def synchronize(self) -> None:
        self.runtime().synchronize()

    def empty_cache(self) -> None:
        self.runtime().empty_cache()

    def manual_seed(self, seed: int) -> None:
        super().manual_seed(seed)
        self.runtime().manual_seed_all(seed)

    def reset_peak_memory(self) -> None:
        self.runtime().reset_peak_memory_stats()

    def memory(self) -> MemoryReading:
        rt = self.runtime()
        return MemoryReading(
            peak_bytes=int(rt.max_memory_allocated()),
            current_bytes=int(rt.memory_allocated()),
            kind="allocator",
        )
