"""cpu kernel of ``adamw8bit_update``: the reference's arithmetic on slices of whole blocks.

The moments are dequantized, updated and requantized 4096 blocks (1 Mi elements) at a time, so the
float32 temporaries of a step stay at a few MiB whatever the parameter's size (the reference, like
bitsandbytes' CPU kernel, materializes several float32 copies of the whole parameter). The 8-bit
(de)quantization runs the cpu kernels of ``quantize_blockwise_8bit`` / ``dequantize_blockwise_8bit``.
Bit-identical to the reference (same float operations per element).
"""

from __future__ import annotations

import functools

from ... import _registry
from ...adamw8bit import ADAMW8BIT_UPDATE, adamw8bit_update_chunked

#: blocks of 256 elements per slice: 1 Mi elements, ~24 MiB of float32 temporaries
CHUNK_BLOCKS = 4096


def register() -> list[str]:
    """Register the chunked update as the CPU kernel of ``adamw8bit_update``."""
    kernel = functools.partial(adamw8bit_update_chunked, chunk_blocks=CHUNK_BLOCKS)
    return _registry.register_kernels("cpu", {ADAMW8BIT_UPDATE: kernel})
