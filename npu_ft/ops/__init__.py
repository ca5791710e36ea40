"""npu_ft ops: schemas, fake kernels, autograd and pure-torch reference kernels, plus the faster
per-device kernels that :mod:`npu_ft.ops.backends` registers where their device can run.

Public API (Python entry points that check their arguments, then call ``torch.ops.npu_ft.*``):
see ``nf4`` and ``lora`` below and docs/ops.md.
"""

from __future__ import annotations

# isort: off
# defining the ops: nf4 (NF4 / 8-bit blockwise) first, then lora (lora_linear, the fused nf4_linear)
from . import nf4  # noqa: F401
from . import lora  # noqa: F401
# the LoRA family built on them: DoRA (dora_linear, dora_nf4_linear) and LoRA-FA (frozen A)
from . import dora  # noqa: F401
from . import lora_fa  # noqa: F401
# isort: on
from ._registry import kernel_calls, reset_kernel_calls
from .backends import loaded_backends, register_available_backends

BACKEND_STATUS = register_available_backends()

__all__ = ["BACKEND_STATUS", "kernel_calls", "loaded_backends", "register_available_backends", "reset_kernel_calls"]
