"""The one interface every device backend answers.

Everything in npu-ft that needs to know about the accelerator asks a :class:`DeviceBackend`;
nothing outside ``npu_ft/device`` mentions ``torch.cuda`` or ``torch.npu``.
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass
from typing import Any

import torch


class DeviceUnavailableError(RuntimeError):
    """Raised when a device is asked for by name but cannot be used here."""


class DeviceNameError(ValueError):
    """A device name that is not one of auto / cpu / cuda / npu (from an argument or ``$NPU_FT_DEVICE``)."""


@dataclass(frozen=True)
class MemoryReading:
    """Peak memory of one phase, in bytes.

    ``peak_bytes`` is the high-water mark since the last :meth:`DeviceBackend.reset_peak_memory`;
    ``kind`` says what was measured ("allocator" for a device caching allocator, "rss" for the
    process's resident set on CPU).
    """

    peak_bytes: int
    current_bytes: int
    kind: str


class DeviceBackend(abc.ABC):
    """A device kind (cpu, cuda or npu) and everything the rest of npu-ft asks of it."""

    #: short name used in configs, env vars and reports: "cpu", "cuda" or "npu"
    name: str = ""
    #: torch.distributed backend for this device: "gloo", "nccl" or "hccl"
    dist_backend: str = ""

    # -- availability -------------------------------------------------------------------------
    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when the device can be used here, else a short human-readable reason."""

    def reprobe(self) -> None:
        """Forget any cached availability probe (after a backend was registered at run time)."""
        return None

    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    def require(self) -> DeviceBackend:
        """Return self, or raise :class:`DeviceUnavailableError` naming why it cannot be used."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise DeviceUnavailableError(f"{self.name} unavailable: {reason}")
        return self

    # -- placement ----------------------------------------------------------------------------
    @abc.abstractmethod
    def device_count(self) -> int:
        """Number of devices of this kind visible to the process (CPU: 1)."""

    def torch_device(self, index: int | None = None) -> torch.device:
        """``torch.device`` for device ``index`` (None: the current one)."""
        if index is None:
            return torch.device(self.name)
        return torch.device(self.name, index)

    def device_for_local_rank(self, local_rank: int) -> torch.device:
        """Device a process with LOCAL_RANK=``local_rank`` should use (round-robin over visible)."""
        count = self.device_count()
        if count <= 0:
            raise DeviceUnavailableError(f"{self.name} unavailable: no devices visible")
        return self.torch_device(local_rank % count)

    def set_device(self, device: torch.device) -> None:
        """Make ``device`` the current one for this process (no-op on CPU)."""
        return None

    def local_process_slots(self) -> tuple[int, int]:
        """``(most, default)`` processes one node may run on this device kind: one per visible
        device by default (CPU: at most one per core, one by default)."""
        count = self.device_count()
        return count, max(count, 1)

    def process_group_kwargs(self, device: torch.device) -> dict[str, Any]:
        """Extra ``torch.distributed.init_process_group`` arguments for a worker on ``device``."""
        return {"device_id": device}

    # -- process setup ------------------------------------------------------------------------
    def prepare_process(self, malloc_tuning: bool = True) -> list[str]:
        """Process-wide settings before a model is built; returns what was done, for the log."""
        return []

    def training_arguments(self) -> dict[str, Any]:
        """``transformers.TrainingArguments`` this device needs (CPU: ``use_cpu``)."""
        return {}

    def total_memory_bytes(self) -> int | None:
        """Memory of the current device (CPU: the machine's RAM); None when unknown."""
        return None

    # -- capabilities -------------------------------------------------------------------------
    @abc.abstractmethod
    def supports_bf16(self) -> bool: ...

    @abc.abstractmethod
    def supports_fp16(self) -> bool: ...

    def device_name(self) -> str:
        """Marketing name of the device (e.g. 'Ascend910B2', 'NVIDIA H100'), for reports."""
        return self.name

    # -- runtime ------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for all queued work on the current device (no-op on CPU)."""
        return None

    def empty_cache(self) -> None:
        """Return cached allocator blocks to the device (no-op on CPU)."""
        return None

    def rng_runtime(self) -> Any | None:
        """The module holding this device's random generators (``get_rng_state`` / ``set_rng_state``
        / ``*_all``), or None where torch's CPU generator is all there is (cpu, or unavailable)."""
        return None

    def manual_seed(self, seed: int) -> None:
        """Seed Python, torch's CPU generator and every device generator of this kind."""
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % (2**32))
        except ImportError:  # pragma: no cover - numpy is an install requirement
            pass

    # -- memory -------------------------------------------------------------------------------
    @abc.abstractmethod
    def reset_peak_memory(self) -> None:
        """Start a new phase: the next :meth:`memory` reports the peak from now on."""

    @abc.abstractmethod
    def memory(self) -> MemoryReading:
        """Peak and current memory of the current phase, in bytes."""

    def describe(self) -> dict:
        """Facts for reports and `npu-ft env`."""
        info: dict[str, Any] = {"device": self.name, "dist_backend": self.dist_backend}
        reason = self.unavailable_reason()
        info["available"] = reason is None
        if reason is not None:
            info["reason"] = reason
            return info
        info.update(
            device_name=self.device_name(),
            device_count=self.device_count(),
            bf16=self.supports_bf16(),
            fp16=self.supports_fp16(),
        )
        return info
