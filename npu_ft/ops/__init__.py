"""npu_ft ops: schemas, fake kernels, autograd and pure-torch reference kernels, plus the faster
per-device kernels that :mod:`npu_ft.ops.backends` registers where their device can run.

``import npu_ft`` imports this package once torch is imported: every ``torch.ops.npu_ft.*`` op is
defined and the cpu kernels are registered, without probing any device; cuda / npu kernels register
on first use (see :mod:`npu_ft.ops.backends`). Public API (Python entry points that check their arguments, then call
``torch.ops.npu_ft.*``): see ``nf4`` and ``lora`` below and docs/ops.md.
"""

from __future__ import annotations

# isort: off
# defining the ops: nf4 (NF4 / 8-bit blockwise) first, then lora (lora_linear, the fused nf4_linear),
# then the fused loss, the decoder-block ops (rms_norm, rope, swiglu) and adamw8bit
from . import nf4  # noqa: F401
from . import lora  # noqa: F401
from . import linear_cross_entropy  # noqa: F401
from . import rms_norm  # noqa: F401
from . import rope  # noqa: F401
from . import swiglu  # noqa: F401
from . import adamw8bit  # noqa: F401  (the 8-bit AdamW step; uses the 8-bit blockwise ops)
# the LoRA family built on them: DoRA (dora_linear, dora_nf4_linear) and LoRA-FA (frozen A)
from . import dora  # noqa: F401
from . import lora_fa  # noqa: F401
# isort: on
from . import _registry
from ._registry import kernel_calls, reset_kernel_calls, tolerance
from .backends import loaded_backends, register_available_backends, register_for_device

_registry.set_backend_loader(register_for_device)
register_available_backends(("cpu",))


def __getattr__(name: str):
    if name == "BACKEND_STATUS":  # probes every device: only when asked for
        return register_available_backends()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKEND_STATUS",
    "kernel_calls",
    "loaded_backends",
    "register_available_backends",
    "reset_kernel_calls",
    "tolerance",
]
