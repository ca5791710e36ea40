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

Each op also carries its **tolerance table** (:func:`tolerance`): how close a kernel's result must
be to the op's oracle, by dtype. The op tests and ``npu-ft doctor`` read this one table.

Backends that need a device probe register on first use: the reference kernel, called with a
tensor of a device type it has not seen yet, asks the hook set with :func:`set_backend_loader` to
register that device's kernels, and if that gave the op a kernel there, dispatches the call again.

Set ``NPU_FT_KERNELS=reference`` to register no backend kernel at all (everything runs the
reference), or e.g. ``NPU_FT_KERNELS=reference,cpu`` to allow only those.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

NAMESPACE = "npu_ft"
_LIB = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901 - owned by this module for the process

DISPATCH_KEYS = {
    "reference": "CompositeExplicitAutograd",
    "cpu": "CPU",
    "cuda": "CUDA",
    "npu": "PrivateUse1",
}

#: a backend's kernels: {op name without namespace: kernel function}
KernelTable = dict[str, Callable[..., Any]]

#: calls per (op name without namespace, kernel name) since the last :func:`reset_kernel_calls`
KERNEL_CALLS: collections.Counter = collections.Counter()

#: kernel names registered per op, in registration order
REGISTERED: dict[str, list[str]] = collections.defaultdict(list)


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How close a kernel's result must be to the oracle's: elementwise
    ``|result - ref| <= rtol * |ref| + atol * max(1, max|ref|)``.

    The absolute part scales with the tensor's largest entry because kernels that sum in another
    order (or round at another point) differ by a few ulps *of the largest terms*: an accumulated
    gradient element near zero says nothing about a kernel's precision on its own.
    """

    rtol: float
    atol: float

    @property
    def exact(self) -> bool:
        return self.rtol == 0.0 and self.atol == 0.0

    def atol_for(self, reference: torch.Tensor) -> float:
        """The absolute tolerance for ``reference``: ``atol * max(1, max|reference|)``."""
        if self.exact or reference.numel() == 0:
            return self.atol
        return self.atol * max(1.0, float(reference.detach().abs().max()))

    def passes(self, result: torch.Tensor, reference: torch.Tensor) -> bool:
        """True when every element is within the tolerance (NaN never is; shapes must match)."""
        if result.shape != reference.shape:
            return False
        result, reference = result.detach().double(), reference.detach().double()
        bound = self.rtol * reference.abs() + self.atol_for(reference)
        return bool(((result - reference).abs() <= bound).all())

    def assert_close(self, result: torch.Tensor, reference: torch.Tensor, msg=None) -> None:
        """``torch.testing.assert_close`` with this tolerance (dtypes must match too)."""
        torch.testing.assert_close(result, reference, rtol=self.rtol, atol=self.atol_for(reference), msg=msg)

    def describe(self) -> str:
        return "exact" if self.exact else f"{self.rtol:g}*|ref|+{self.atol:g}*max(1,|ref|)"


#: for ops whose results must equal the oracle's bit for bit (codes, packed bytes)
EXACT = Tolerance(0.0, 0.0)

#: the default table of an op with float results, by the dtype the kernel ran in: a few ulps of
#: that dtype (fp32 eps 2**-23, bf16 2**-8, fp16 2**-11) relative to the tensor's scale. Measured
#: on the op tests' awkward shapes, the CPU kernels need at most ~6e-8 (fp32), ~4e-3 (bf16) and
#: ~2e-4 (fp16) times max(1, max|ref|) beyond the rtol part.
FLOAT_TOLERANCES: Mapping[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(1e-5, 1e-6),
    torch.bfloat16: Tolerance(2e-2, 2e-2),
    torch.float16: Tolerance(2e-3, 2e-3),
}

_TOLERANCES: dict[str, Mapping[torch.dtype, Tolerance]] = {}


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


def define(
    schema: str, tags: tuple = (), tolerances: Tolerance | Mapping[torch.dtype, Tolerance] = FLOAT_TOLERANCES
) -> str:
    """Define ``npu_ft::<schema>`` with its tolerance table (one :class:`Tolerance` for every dtype,
    or one per dtype); returns the op's short name (e.g. "nf4_dequantize")."""
    _LIB.define(schema, tags=tags)
    name = schema.split("(", 1)[0].strip()
    set_tolerances(name, tolerances)
    return name


def set_tolerances(op: str, tolerances: Tolerance | Mapping[torch.dtype, Tolerance]) -> None:
    """Set ``op``'s tolerance table; also for computations that are not torch.library ops (e.g. the
    fused ``linear_cross_entropy``), so that tests and ``npu-ft doctor`` find them in one place."""
    if isinstance(tolerances, Tolerance):
        tolerances = dict.fromkeys(FLOAT_TOLERANCES, tolerances)
    _TOLERANCES[op.split("::")[-1]] = dict(tolerances)


def tolerance(op: str, dtype: torch.dtype) -> Tolerance:
    """How close ``op``'s result computed in ``dtype`` must be to its oracle's (see :class:`Tolerance`)."""
    table = _TOLERANCES.get(op.split("::")[-1])
    if table is None:
        raise KeyError(f"{op}: no tolerance table (ops: {sorted(_TOLERANCES)})")
    if dtype not in table:
        raise KeyError(f"{op}: no tolerance for {dtype} (has {sorted(map(str, table))})")
    return table[dtype]


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


#: device types the reference kernel has seen (each gets one chance to load its backend)
_SEEN_DEVICE_TYPES: set[str] = {"cpu", "meta"}
_BACKEND_LOADER: list[Callable[[str], object]] = []


def set_backend_loader(loader: Callable[[str], object]) -> None:
    """``loader(device_type)`` registers the kernels of that device's backend if it can run here.
    The reference kernel calls it once per device type, on the first call with such a tensor."""
    _BACKEND_LOADER[:] = [loader]


def _device_type(args) -> str | None:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    return None


def _reference_kernel(op: str, fn: Callable) -> Callable:
    """The reference kernel, counted, loading a device's backend on its first call with that device."""
    counted = _counted(op, "reference", fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = _device_type(args)
        if device_type is not None and device_type not in _SEEN_DEVICE_TYPES and _BACKEND_LOADER:
            _SEEN_DEVICE_TYPES.add(device_type)
            _BACKEND_LOADER[0](device_type)
            if device_type in REGISTERED[op]:  # the op has a kernel there now (kernel name == device type)
                return getattr(torch.ops.npu_ft, op).default(*args, **kwargs)
        return counted(*args, **kwargs)

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
    wrapper = _reference_kernel(short, fn) if kernel == "reference" else _counted(short, kernel, fn)
    _LIB.impl(short, wrapper, DISPATCH_KEYS[kernel])
    REGISTERED[short].append(kernel)
    return fn


def register_kernels(kernel: str, table: Mapping[str, Callable]) -> list[str]:
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
