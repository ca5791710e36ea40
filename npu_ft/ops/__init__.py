"""npu_ft ops: schemas, fake kernels, autograd and pure-torch reference kernels, plus the faster
per-device kernels that :mod:`npu_ft.ops.backends` registers where their device can run.

Public API (Python entry points that check their arguments, then call ``torch.ops.npu_ft.*``):
see ``nf4`` and ``lora`` below and docs/ops.md.
"""

from __future__ import annotations

from . import _registry
from ._registry import kernel_calls, reset_kernel_calls
from . import nf4  # noqa: F401  (defines the NF4 / 8-bit blockwise ops)
from . import lora  # noqa: F401  (defines lora_linear and the fused nf4_linear)
from .backends import loaded_backends, register_available_backends

BACKEND_STATUS = register_available_backends()

__all__ = ["BACKEND_STATUS", "kernel_calls", "loaded_backends", "register_available_backends", "reset_kernel_calls"]
