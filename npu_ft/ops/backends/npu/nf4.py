"""npu kernels of the NF4 and 8-bit blockwise ops (Ascend, via torch_npu).

Why a lookup table and not a torch_npu quantized matmul: torch_npu's weight-quantized GEMMs
(``npu_weight_quant_batchmatmul``, ``npu_quant_matmul``) dequantize *affinely* -
``(w - offset) * scale`` for int8/int4 weights. NF4's 16 levels are quantiles of a normal
distribution, not evenly spaced, so no scale/offset reproduces them, and re-quantizing to int4
would change the model. bitsandbytes' NF4 storage must stay byte-for-byte what it is (weights
quantized anywhere load everywhere), so the NPU rebuilds W in the compute dtype from a table and
hands the GEMM to the cube unit (see :mod:`npu_ft.ops.backends.npu.lora`).

Dequantize (the hot path of QLoRA, once per forward and once per backward of every layer):

* one byte holds two codes, so a 256-entry **byte -> (high value, low value)** fp32 table turns the
  packed weight into values with a single gather: ``index_select(table[256, 2], 0, bytes)``;
  no per-nibble shifts and masks (aclnn's bitwise kernels on uint8 are the least-trodden path),
* the byte indices are cast to **int32** first: aclnn's IndexSelect/Gather take int32/int64
  indices, and int32 halves the index traffic of int64,
* then one multiply by the per-block absmax (broadcast over ``[blocks, blocksize]``) in fp32 and a
  cast to the target dtype: the same float operations as the reference, so the result is
  bit-identical to it in fp32, bf16 and fp16.

Quantize (runs once per weight, at load):

* per-block absmax with ``abs().amax(dim=1)``, scaled exactly as the reference scales (full blocks
  ``x * (1 / absmax)``, the partial tail block ``x / absmax``),
* the nearest code (ties to the lower one) as the count of NF4 midpoints strictly below the value:
  15 elementwise compares accumulated in int32 - the vector unit's bread and butter - instead of
  ``torch.bucketize``, whose aclnn coverage varies across CANN releases,
* packing as ``hi * 16 + lo`` in int32, cast to uint8 at the end.

8-bit blockwise (double quantization of the NF4 absmax): dequantize is the same gather into the
256-entry code map with int32 indices; quantize reproduces the reference's 65536-entry lookup
table (built once per code map on the CPU and cached per device) and gathers from it.

Verified: bit-exact against the reference kernels on the test suite's fake npu device (which runs
these very torch ops on the CPU). On real Ascend hardware only where ``npu-ft doctor`` / the
``ascend``-marked tests ran; there the aclnn kernels do the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ... import _registry
from ... import nf4 as _nf4
from ...nf4 import NF4_CODE

__all__ = [
    "dequantize_blockwise_8bit_npu",
    "nf4_dequantize_npu",
    "nf4_quantize_npu",
    "quantize_blockwise_8bit_npu",
    "KERNELS",
]

# entries of the reference's 8-bit quantization lookup table (uint16 index space)
_LUT_SIZE = 65536
# code of 0.0: what the padding nibble of an odd-sized tensor holds
_ZERO_CODE = 7

_TABLES: dict[tuple, torch.Tensor] = {}

#: the 15 midpoints between neighbouring NF4 codes, as the float32 values the reference compares
#: against (code i covers (mid[i-1], mid[i]]).
_NF4_MIDPOINTS = [float(m) for m in ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).tolist()]


def _num_blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def _byte_pair_table(device: torch.device) -> torch.Tensor:
    """fp32 [256, 2]: row b = (NF4 value of b's high nibble, NF4 value of b's low nibble)."""
    key = ("nf4_pairs", device)
    table = _TABLES.get(key)
    if table is None:
        byte = torch.arange(256)
        pairs = torch.stack([NF4_CODE[byte // 16], NF4_CODE[byte % 16]], dim=1)
        table = _TABLES[key] = pairs.to(device=device, dtype=torch.float32).contiguous()
    return table


def _pad_or_trim(values: torch.Tensor, length: int) -> torch.Tensor:
    if values.numel() < length:
        return torch.nn.functional.pad(values, (0, length - values.numel()))
    return values[:length]


# ----------------------------------------------------------------------------------------------
# NF4
# ----------------------------------------------------------------------------------------------
def nf4_dequantize_npu(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """``packed`` uint8 [(n+1)//2, 1] + ``absmax`` fp32 [blocks] -> ``dtype`` tensor of ``shape``."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    nblocks = _num_blocks(n, blocksize)
    index = packed.reshape(-1).to(torch.int32)
    values = torch.index_select(_byte_pair_table(packed.device), 0, index).reshape(-1)  # [2 * bytes]
    values = _pad_or_trim(values, nblocks * blocksize).view(nblocks, blocksize)
    values = values * absmax.reshape(nblocks, 1).to(torch.float32)
    return values.reshape(-1)[:n].to(dtype).reshape(shape)


def _nf4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """int32 NF4 code of each value in [-1, 1]: how many midpoints lie strictly below it."""
    codes = torch.zeros(scaled.shape, dtype=torch.int32, device=scaled.device)
    for mid in _NF4_MIDPOINTS:
        codes += scaled > mid
    # the reference (torch.bucketize) sorts NaN after every midpoint
    return torch.where(torch.isnan(scaled), torch.full_like(codes, len(_NF4_MIDPOINTS)), codes)


def nf4_quantize_npu(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize ``A`` -> (``packed`` uint8 [(n+1)//2, 1], ``absmax`` fp32 [blocks])."""
    scaled, absmax = _nf4.scale_blocks_nf4(A, blocksize)
    n = scaled.numel()
    codes = _nf4_codes(scaled)
    if n % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=_ZERO_CODE)
    pairs = codes.view(-1, 2)
    packed = (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8)
    return packed.unsqueeze(1), absmax


# ----------------------------------------------------------------------------------------------
# 8-bit blockwise
# ----------------------------------------------------------------------------------------------
def dequantize_blockwise_8bit_npu(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """``code[q] * absmax[block]`` in fp32, cast to ``dtype``; shaped like ``q``."""
    n = q.numel()
    nblocks = _num_blocks(n, blocksize)
    table = code.to(device=q.device, dtype=torch.float32).reshape(-1)
    values = torch.index_select(table, 0, q.reshape(-1).to(torch.int32))
    values = _pad_or_trim(values, nblocks * blocksize).view(nblocks, blocksize)
    values = values * absmax.reshape(nblocks, 1).to(torch.float32)
    return values.reshape(-1)[:n].to(dtype).reshape(q.shape)


def _lut_8bit(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 [65536]: code index of each point ``-1 + 2 i / 65535`` (nearest, ties to the lower).

    Built on the CPU (once per distinct code map) and cached on ``device``.
    """
    code_cpu = code.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
    key = ("lut8", device, code_cpu.numpy().tobytes())
    lut = _TABLES.get(key)
    if lut is None:
        mids = 0.5 * (code_cpu[:-1] + code_cpu[1:])
        points = torch.arange(_LUT_SIZE, dtype=torch.float32)
        points = -1.0 + (2.0 * points) / float(_LUT_SIZE - 1)
        lut = torch.searchsorted(mids.contiguous(), points, right=False).to(torch.int32)
        lut = _TABLES[key] = lut.to(device)
    return lut


def quantize_blockwise_8bit_npu(
    A: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the ascending 256-entry ``code`` -> (q uint8 like A, absmax)."""
    flat = A.reshape(-1).to(torch.float32)
    n = flat.numel()
    nblocks = _num_blocks(n, blocksize)
    blocks = _pad_or_trim(flat, nblocks * blocksize).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    zero_block = absmax == 0
    inv = torch.where(zero_block, torch.zeros_like(absmax), 1.0 / absmax)
    scaled = blocks * inv.unsqueeze(1)
    # the reference's index arithmetic, in the same order (bit-exact)
    position = scaled.clamp(-1.0, 1.0).add_(1.0).mul_(0.5).mul_(float(_LUT_SIZE - 1)).add_(0.5)
    index = position.to(torch.int32).reshape(-1)
    q = torch.index_select(_lut_8bit(code, A.device), 0, index).view(nblocks, blocksize)
    q = torch.where(zero_block.unsqueeze(1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].to(torch.uint8).reshape(A.shape), absmax


KERNELS: _registry.KernelTable = {
    "nf4_quantize": nf4_quantize_npu,
    "nf4_dequantize": nf4_dequantize_npu,
    "quantize_blockwise_8bit": quantize_blockwise_8bit_npu,
    "dequantize_blockwise_8bit": dequantize_blockwise_8bit_npu,
}

