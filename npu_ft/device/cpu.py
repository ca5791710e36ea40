"""CPU backend: always available; peak memory is the process's resident-set high-water mark."""

from __future__ import annotations

import os
import platform
import re

import torch

from .base import DeviceBackend, MemoryReading

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_glibc_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30,
                      top_pad: int = 64 << 20) -> bool:
    """Keep large, short-lived CPU tensors in glibc's heap instead of fresh ``mmap`` pages.

    By default glibc serves every allocation above its (dynamic, <= 32 MiB) mmap threshold with a
    new ``mmap`` and returns it with ``munmap`` on free. A training step allocates and frees the
    same large buffers every step (the dense ``[vocab, hidden]`` embedding/head gradient, logits
    chunks, MLP activations), so each step page-faults all of them in again and the kernel zeroes
    every page: on Qwen's 151,936-row vocabulary that is hundreds of MiB of faults per step (the
    tiny-model demo: 62 k minor faults per step, 1.5x of its step time). Raising the mmap and trim
    thresholds lets freed blocks be reused by the next step. The resident peak stays about the same
    (the same buffers are live at the peak either way); freed memory is returned to the OS less
    eagerly. Call once, before the model is built. Returns False where the C library is not glibc
    (musl, macOS, Windows): nothing is changed there.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    ok &= mallopt(_M_TOP_PAD, int(top_pad)) == 1
    return bool(ok)


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

    def local_process_slots(self) -> tuple[int, int]:
        return os.cpu_count() or 1, 1

    def process_group_kwargs(self, device: torch.device) -> dict[str, object]:
        return {}

    def prepare_process(self, malloc_tuning: bool = True) -> list[str]:
        if malloc_tuning and tune_glibc_malloc():
            return ["cpu_malloc_tuning: glibc mmap/trim thresholds raised (per-step buffers are reused)"]
        return []

    def training_arguments(self) -> dict[str, object]:
        return {"use_cpu": True}

    def total_memory_bytes(self) -> int | None:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None

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
