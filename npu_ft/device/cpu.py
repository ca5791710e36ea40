"""CPU backend: always available; peak memory is the process's resident-set high-water mark."""

from __future__ import annotations

import os
import platform
import re

import torch

from .base import DeviceBackend, MemoryReading

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _read_status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class CpuBackend(DeviceBackend):
    """The host CPU.

    Peak memory per phase: Linux keeps the resident-set high-water mark in ``VmHWM``; writing "5"
    to ``/proc/self/clear_refs`` resets it to the current RSS, so each phase gets its own peak
    (not the lifetime ``ru_maxrss``). Where that file cannot be written (non-Linux, locked-down
    kernels) the reading falls back to ``psutil``'s current RSS and says so in ``kind``.
    """

    name = "cpu"
    dist_backend = "gloo"

    def __init__(self) -> None:
        self._can_reset_hwm: bool | None = None

    def unavailable_reason(self) -> str | None:
        return None

    def device_count(self) -> int:
        return 1

    def torch_device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def device_for_local_rank(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    def supports_bf16(self) -> bool:
        return True

    def supports_fp16(self) -> bool:
        return True

    def device_name(self) -> str:
        return platform.processor() or platform.machine() or "cpu"

    def reset_peak_memory(self) -> None:
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
            self._can_reset_hwm = True
        except OSError:
            self._can_reset_hwm = False

    def memory(self) -> MemoryReading:
        current = _read_status_kib("VmRSS")
        peak = _read_status_kib("VmHWM")
        if current is not None and peak is not None and self._can_reset_hwm is not False:
            return MemoryReading(peak_bytes=peak * 1024, current_bytes=current * 1024, kind="rss")
        import psutil

        rss = psutil.Process(os.getpid()).memory_info().rss
        return MemoryReading(peak_bytes=rss, current_bytes=rss, kind="rss-current")
