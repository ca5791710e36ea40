"""The ``torch.npu``-like runtime module of the fake npu device (registered as ``torch.npu``).

It follows the names torch_npu gives its ``torch.npu`` module (which mirror ``torch.cuda``), so
code written against the real device — npu_ft's device layer first of all — runs unchanged.
Memory figures come from the C++ allocator's counters: bytes of live fake-npu tensors, and their
high-water mark since the last :func:`reset_peak_memory_stats` (per process, one device).

Random numbers: the fake device's random ops run on the CPU through the fallback and draw from the
CPU generator, so :func:`manual_seed` seeds that generator.
"""

from __future__ import annotations

import contextlib

import torch

DEVICE_NAME = "FakeNPU"
DEVICE_COUNT = 1


def _ops():
    return torch.ops.npu_ft_fake_npu


def _index(device=None) -> int:
    if device is None:
        return current_device()
    if isinstance(device, int):
        index = device
    else:
        device = torch.device(device)
        if device.type != "npu":
            raise ValueError(f"expected an npu device, got {device}")
        index = 0 if device.index is None else device.index
    if not 0 <= index < DEVICE_COUNT:
        raise ValueError(f"invalid npu device index {index} ({DEVICE_COUNT} device(s))")
    return index


# -- availability ------------------------------------------------------------------------------
def is_available() -> bool:
    return bool(_ops().is_enabled())


def is_initialized() -> bool:
    return True


def _lazy_init() -> None:
    """Nothing to initialize; present because torch calls it before the first npu tensor."""


def _is_in_bad_fork() -> bool:
    return False


def device_count() -> int:
    return DEVICE_COUNT if is_available() else 0


def current_device() -> int:
    return 0  # the fake has exactly one device


def set_device(device) -> None:
    _index(device)  # validates; index 0 is the only one


class device:  # noqa: N801 - the name torch.cuda / torch.npu use
    """Context manager that makes ``index`` the current npu device."""

    def __init__(self, index) -> None:
        self.index = _index(index)
        self.previous = 0

    def __enter__(self):
        self.previous = current_device()
        set_device(self.index)
        return self

    def __exit__(self, *exc) -> None:
        set_device(self.previous)


def get_device_name(device=None) -> str:
    _index(device)
    return DEVICE_NAME


def get_device_properties(device=None):
    _index(device)
    return {"name": DEVICE_NAME, "total_memory": 0}


def is_bf16_supported() -> bool:
    return True


def get_amp_supported_dtype() -> list[torch.dtype]:
    return [torch.float16, torch.bfloat16]


# -- runtime -----------------------------------------------------------------------------------
def synchronize(device=None) -> None:
    """Every fake-npu op finishes before it returns; nothing to wait for."""
    _index(device)


def empty_cache() -> None:
    """The fake allocator caches nothing (freed blocks go straight back to the host)."""


@contextlib.contextmanager
def stream(_stream=None):
    yield


# -- memory ------------------------------------------------------------------------------------
def memory_allocated(device=None) -> int:
    _index(device)
    return int(_ops().memory_allocated())


def max_memory_allocated(device=None) -> int:
    _index(device)
    return int(_ops().max_memory_allocated())


def memory_reserved(device=None) -> int:
    return memory_allocated(device)


def max_memory_reserved(device=None) -> int:
    return max_memory_allocated(device)


def reset_peak_memory_stats(device=None) -> None:
    _index(device)
    _ops().reset_peak_memory_stats()


def reset_max_memory_allocated(device=None) -> None:
    reset_peak_memory_stats(device)


def memory_stats(device=None) -> dict:
    return {
        "allocated_bytes.all.current": memory_allocated(device),
        "allocated_bytes.all.peak": max_memory_allocated(device),
        "num_alloc_retries": 0,
    }


# -- random numbers ----------------------------------------------------------------------------
def manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def manual_seed_all(seed: int) -> None:
    manual_seed(seed)


def seed() -> None:
    torch.default_generator.seed()


def seed_all() -> None:
    seed()


def initial_seed() -> int:
    return torch.default_generator.initial_seed()


def get_rng_state(device=None) -> torch.Tensor:
    _index(device)
    return torch.default_generator.get_state()


def set_rng_state(state: torch.Tensor, device=None) -> None:
    _index(device)
    torch.default_generator.set_state(state)


def get_rng_state_all() -> list[torch.Tensor]:
    return [get_rng_state()]


def set_rng_state_all(states) -> None:
    for state in states:
        set_rng_state(state)
