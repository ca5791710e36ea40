"""npu kernel of ``adamw8bit_update`` (Ascend, via torch_npu).

torch_npu has a fused fp32 AdamW (``npu_apply_adam_w``) but nothing for 8-bit states, so the step is
the reference's arithmetic in torch ops on the device, on slices of 4096 whole blocks (1 Mi
elements) so device temporaries stay at ~24 MiB: elementwise ops for the moments and the parameter
(vector unit), and the 8-bit (de)quantization through the npu kernels of ``quantize_blockwise_8bit``
/ ``dequantize_blockwise_8bit`` (gathers with int32 indices from the 256-entry code map and the
65536-entry lookup table).

Verified: bit-exact against the reference on the test suite's fake npu device (which runs these
very torch ops on the CPU). On real Ascend hardware, aclnn may fuse or order the float operations
differently: a moment on a code boundary may then land on the neighbouring code (``npu-ft doctor``
checks that no code is more than one off and the parameter within tolerance).
"""

from __future__ import annotations

import functools

from ... import _registry
from ...adamw8bit import ADAMW8BIT_UPDATE, adamw8bit_update_chunked

#: blocks of 256 elements per slice: 1 Mi elements, ~24 MiB of float32 temporaries on the device
CHUNK_BLOCKS = 4096


#: the chunked update is this backend's kernel of ``adamw8bit_update``
KERNELS: _registry.KernelTable = {
    ADAMW8BIT_UPDATE: functools.partial(adamw8bit_update_chunked, chunk_blocks=CHUNK_BLOCKS),
}
