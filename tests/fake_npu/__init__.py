"""Test-only fake "npu" device: a PrivateUse1 backend over host memory, named "npu".

Why: torch_npu (and CANN) cannot run here, yet npu-ft must prove that npu tensors reach its npu
kernels, that autograd and dtypes flow on an npu device, and that the device layer's memory
accounting works. The C++ half (``fake_npu.cpp``) is built once per machine with
``torch.utils.cpp_extension.load`` (cached under ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``; rebuilt only when the source changes) and gives: a counting
allocator, the kernels a backend must own, and a CPU fallback for every other op. The Python half
renames PrivateUse1 to "npu", generates the ``Tensor.npu()`` / ``is_npu`` helpers and registers
:mod:`tests.fake_npu.runtime` as ``torch.npu``.

Living with the rest of the test session: PrivateUse1 can be renamed once per process and a loaded
library cannot be unloaded, so the fake stays registered after it is loaded. What stays is inert
for CPU code (only npu tensors reach its kernels); :func:`deactivate` makes it report itself
unavailable again (``torch.npu.is_available()`` False, so the device layer's auto selection and
DataLoader's pin_memory ignore it). Use :func:`fake_npu_active` or the ``fake_npu`` fixture
(:mod:`tests.fake_npu.fixtures`) to have it on only while a test module needs it.

Never load it where a real torch_npu is present: :func:`load_fake_npu` refuses when PrivateUse1 was
already renamed by someone else.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

EXTENSION_NAME = "npu_ft_fake_npu"
SOURCE = Path(__file__).with_name("fake_npu.cpp")
DEVICE_TYPE = "npu"

_STATE: dict = {"library": None, "runtime": None, "load_seconds": None}


class FakeNpuUnavailable(RuntimeError):
    """The fake npu cannot be loaded here (no compiler, or a real npu backend owns PrivateUse1)."""


def is_loaded() -> bool:
    return _STATE["runtime"] is not None


def load_seconds() -> float | None:
    """Seconds the first :func:`load_fake_npu` of this process took (build or cache hit)."""
    return _STATE["load_seconds"]


def _build() -> str:
    from torch.utils import cpp_extension

    verbose = os.environ.get("NPU_FT_FAKE_NPU_VERBOSE", "") not in ("", "0")
    try:
        return cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(SOURCE)],
            extra_cflags=["-O1"],
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means "cannot test with it"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FakeNpuUnavailable(f"fake npu extension failed to build: {type(exc).__name__}: {first}") from exc


def load_fake_npu():
    """Build (once per machine) and load the fake npu; return its ``torch.npu`` module. Idempotent.

    Also switches the device on (see :func:`activate`).
    """
    if is_loaded():
        activate()
        return _STATE["runtime"]
    current_name = torch._C._get_privateuse1_backend_name()
    if current_name != "privateuseone":
        raise FakeNpuUnavailable(
            f"PrivateUse1 is already the {current_name!r} backend (a real torch_npu?); "
            "the fake npu is never loaded next to a real one"
        )
    start = time.perf_counter()
    library = _build()
    torch.ops.load_library(library)
    torch.utils.rename_privateuse1_backend(DEVICE_TYPE)
    torch.utils.generate_methods_for_privateuse1_backend()
    from . import runtime

    torch._register_device_module(DEVICE_TYPE, runtime)
    _STATE.update(library=library, runtime=runtime, load_seconds=time.perf_counter() - start)
    activate()
    return runtime


def _ops():
    return torch.ops.npu_ft_fake_npu


def activate() -> None:
    """Report the fake npu as available (``torch.npu.is_available()`` True)."""
    _ops().set_enabled(True)


def deactivate() -> None:
    """Report the fake npu as unavailable again; its tensors and kernels keep working."""
    if is_loaded():
        _ops().set_enabled(False)


def fallback_calls(op: str) -> int:
    """How often ATen op ``op`` (e.g. "aten::mm.out") ran through the CPU fallback."""
    return int(_ops().fallback_calls(op))


def fallback_ops() -> list[str]:
    """Every ATen op that ran through the CPU fallback since the last reset."""
    return list(_ops().fallback_ops())


def reset_fallback_calls() -> None:
    _ops().reset_fallback_calls()


def allocation_calls() -> int:
    """Number of fake-npu allocations since the library was loaded."""
    return int(_ops().allocation_calls())


@contextlib.contextmanager
def fake_npu_active():
    """Load + activate the fake npu, make npu-ft see it, and switch it off again afterwards.

    Inside: ``npu_ft.device.get_backend("npu")`` works, npu-ft's npu kernels are registered, and
    autograd can run backward passes on npu tensors (see :func:`_autograd_guard`).
    """
    load_fake_npu()
    from npu_ft.device import all_backends

    npu = all_backends()["npu"]
    npu.reprobe()
    try:
        import npu_ft.ops

        npu_ft.ops.register_available_backends()
        with _autograd_guard():
            yield _STATE["runtime"]
    finally:
        deactivate()
        npu.reprobe()


@contextlib.contextmanager
def _autograd_guard():
    """Run backward passes in the caller's thread when the engine cannot route npu work.

    The autograd engine sizes its per-device worker queues once, on the first backward pass of
    the process. If that happened before the fake npu was loaded (an earlier test ran backward),
    npu backward would hit an internal assert; with multithreading off the engine runs every
    node on the calling thread, which is equally correct. The real torch_npu is imported before
    any backward, so this never applies there.
    """
    probe = torch.ones(2, device=DEVICE_TYPE, requires_grad=True)
    try:
        (probe * 2).sum().backward()
    except RuntimeError:
        with torch.autograd.set_multithreading_enabled(False):
            yield
        return
    yield


__all__ = [
    "DEVICE_TYPE",
    "FakeNpuUnavailable",
    "activate",
    "allocation_calls",
    "deactivate",
    "fake_npu_active",
    "fallback_calls",
    "fallback_ops",
    "is_loaded",
    "load_fake_npu",
    "load_seconds",
    "reset_fallback_calls",
]
