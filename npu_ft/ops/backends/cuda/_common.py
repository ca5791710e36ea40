"""Helpers shared by the Triton kernel modules (underscore: not an op module, no ``KERNELS``)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def needs_bf16_rounding(dtype: torch.dtype) -> bool:
    """Whether a kernel storing ``dtype`` must round fp32 -> bf16 by hand.

    Triton's interpreter *truncates* fp32 -> bf16 on a cast, where the GPU (and torch) round to
    nearest-even; kernels pass this as a constexpr so the GPU build pays nothing for it.
    """
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def round_to_bf16_rne(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still as fp32.

    A later ``.to(tl.bfloat16)`` is then exact whether the cast truncates or rounds.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = bits & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
