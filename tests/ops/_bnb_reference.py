"""bitsandbytes' own NF4 dequantization *definition*, independent of its native CPU kernel.

bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` kernel (``cdequantize_blockwise_cpu_nf4_*``)
indexes the absmax of each element per row: on CPUs with AVX-512 it returns wrong values whenever a
quantization block spans two rows (last dimension not a multiple of the blocksize; measured: up to
0.5 x absmax error per element for a [64, 128] weight at blocksize 256, or [48, 80] at 64, where
NF4 itself is within 0.16 x absmax). Its Python fallback for the same op
(``bitsandbytes.backends.default.ops._dequantize_4bit_compute``) is the format's definition and is
what these tests compare npu-ft against. Shapes whose rows hold whole blocks are exact on both
bitsandbytes paths (tests that go through ``bnb.nn.Linear4bit`` use such shapes).
"""

from __future__ import annotations

import torch


def bnb_dequantize_4bit(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` without the native CPU kernel.

    packed: the bnb storage, uint8 [(n + 1) // 2, 1]; quant_state: a ``bitsandbytes.functional.QuantState``
    (nested = double quantization); returns a tensor of ``quant_state.shape`` in ``dtype``
    (default ``quant_state.dtype``).
    """
    import bitsandbytes.functional as bnb_f
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = quant_state.absmax
    if quant_state.nested:  # double quantization: 8-bit absmax + offset (1-D, no row crossing)
        absmax = bnb_f.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    code = bnb_f.get_4bit_type(quant_state.quant_type, device=packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1).view(torch.uint8), absmax.float(), code,
                                    quant_state.blocksize, quant_state.shape, dtype or quant_state.dtype)
