"""cpu kernels of ``lora_linear`` / ``nf4_linear`` and their backward ops: the fused-addmm kernels
of :mod:`npu_ft.ops.backends._fused_lora` (one ``addmm`` with the bias, the LoRA product added in
place, no full-size temporaries), registered on the CPU key.
"""

from __future__ import annotations

from ... import _registry
from .._fused_lora import KERNELS

__all__ = ["register"]


def register() -> list[str]:
    return _registry.register_kernels("cpu", KERNELS)
