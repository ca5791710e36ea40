"""How an op and its kernels join npu-ft (the bitsandbytes pattern, with torch.library).

* :func:`define` declares an op once in the ``npu_ft`` namespace (schema).
* :func:`register_fake` gives its meta/fake kernel (shapes and dtypes only).
* :func:`register_reference` gives the pure-torch kernel, registered as CompositeExplicitAutograd so
  it serves every device that has no kernel of its own.
* :func:`register_kernel` adds a backend's faster kernel on that backend's dispatch key:
  "cpu" -> CPU, "cuda" -> CUDA, "npu" -> PrivateUse1 (never assume torch_npu's rename happened).

Every kernel registered here is wrapped so that each call is counted per (op, kernel) in
:data:`KERNEL_CALLS`. Tests use the counter to prove that npu tensors reached the npu kernel, and
``npu-ft doctor`` uses it to report which kernel ran.

Set ``NPU_FT_KERNELS=reference`` to register no backend kernel at all (everything runs the
reference), or e.g. ``NPU_FT_KERNELS=reference,cpu`` to allow only those.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable

import torch

NAMESPACE = "npu_ft"
_LIB = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901 - owned by this module for the process

DISPATCH_KEYS = {
    "reference": "CompositeExplicitAutograd",
    "cpu": "CPU",
    "cuda": "CUDA",
    "npu": "PrivateUse1",
}

#: calls per (op name without namespace, kernel name) since the last :func:`reset_kernel_calls`
KERNEL_CALLS: collections.Counter = collections.Counter()

#: kernel names registered per op, in registration order
REGISTERED: dict[str, list[str]] = collections.defaultdict(list)


def enabled_kernels() -> set[str]:
    """Kernel names allowed by ``NPU_FT_KERNELS`` (default: all)."""
    raw = os.environ.get("NPU_FT_KERNELS", "").strip()
    if not raw:
        return set(DISPATCH_KEYS)
    names = {part.strip().lower() for part in raw.split(",") if part.strip()}
    unknown = names - set(DISPATCH_KEYS)
    if unknown:
        raise ValueError(
            f"NPU_FT_KERNELS: unknown kernel name(s) {sorted(unknown)}; expected {sorted(DISPATCH_KEYS)}"
        )
    return names | {"reference"}


def qualified(op: str) -> str:
    return op if "::" in op else f"{NAMESPACE}::{op}"


def define(schema: str, tags: tuple = ()) -> str:
    """Define ``npu_ft::<schema>``; returns the op's short name (e.g. "nf4_dequantize")."""
    _LIB.define(schema, tags=tags)
    return schema.split("(", 1)[0].strip()


def register_fake(op: str, fn: Callable) -> Callable:
    torch.library.register_fake(qualified(op), fn, lib=_LIB)
    return fn


def _counted(op: str, kernel: str, fn: Callable) -> Callable:
    short = op.split("::")[-1]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        KERNEL_CALLS[(short, kernel)] += 1
        return fn(*args, **kwargs)

    return wrapper


def register_reference(op: str, fn: Callable) -> Callable:
    """Register the pure-torch kernel that serves every device without a kernel of its own."""
    return register_kernel(op, "reference", fn)


def register_kernel(op: str, kernel: str, fn: Callable) -> Callable:
    """Register ``fn`` as ``op``'s kernel for backend ``kernel`` ("reference", "cpu", "cuda", "npu").

    Returns ``fn`` unchanged (usable as a decorator). Skipped (returns ``fn``, registers nothing)
    when ``NPU_FT_KERNELS`` excludes that kernel.
    """
    if kernel not in DISPATCH_KEYS:
        raise ValueError(f"kernel must be one of {sorted(DISPATCH_KEYS)}, got {kernel!r}")
    if kernel not in enabled_kernels():
        return fn
    short = op.split("::")[-1]
    _LIB.impl(short, _counted(short, kernel, fn), DISPATCH_KEYS[kernel])
    REGISTERED[short].append(kernel)
    return fn


def register_kernels(kernel: str, table: dict[str, Callable]) -> list[str]:
    """Register each ``{op: fn}`` of ``table`` as backend ``kernel``'s kernel, for the ops that are
    defined; returns the names registered (a backend may carry kernels for ops not loaded)."""
    done = []
    for name, fn in table.items():
        if hasattr(torch.ops.npu_ft, name):
            register_kernel(name, kernel, fn)
            done.append(name)
    return done


def register_autograd(op: str, backward: Callable, setup_context: Callable) -> None:
    torch.library.register_autograd(qualified(op), backward, setup_context=setup_context, lib=_LIB)


def reset_kernel_calls() -> None:
    KERNEL_CALLS.clear()


def kernel_calls(op: str) -> dict[str, int]:
    """Calls of each kernel of ``op`` since the last reset, e.g. ``{"cpu": 3}``."""
    short = op.split("::")[-1]
    return {kernel: n for (name, kernel), n in KERNEL_CALLS.items() if name == short}
