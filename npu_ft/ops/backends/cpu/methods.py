"""cpu kernels of the LoRA-family ops (``dora_*``, ``lora_fa_*``): the torch-composed kernels of
:mod:`npu_ft.ops.backends._fused_methods` (BLAS GEMMs, in-place epilogues, no ``[out, in]`` DoRA
matrix), registered on the CPU key."""

from __future__ import annotations

from .._fused_methods import KERNELS

__all__ = ["KERNELS"]
