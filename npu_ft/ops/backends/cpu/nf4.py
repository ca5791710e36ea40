"""CPU kernels of the NF4 / 8-bit blockwise ops, bit-exact with the reference kernels in
:mod:`npu_ft.ops.nf4` (hence with bitsandbytes 0.50).

Two tiers:

* **native**: the C++ kernels of ``npu_ft/csrc/cpu/nf4.cpp`` (built on first use, see
  :mod:`._native`), threaded over blocks with ``at::parallel_for``. Dequantize builds, per block,
  the 16 scaled NF4 values already rounded to the output dtype, then writes two outputs per packed
  byte (with AVX2 where the CPU has it). The functions here allocate the outputs and call them.
* **torch**: where the native kernels are unavailable (no compiler, ``NPU_FT_CPU_NATIVE=0``) or for
  other dtypes: dequantize gathers ``(code[hi], code[lo])`` pairs from a 256-entry table viewed as
  int64, in cache-sized chunks, then multiplies by absmax straight into the output dtype; the other
  ops run the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ... import _checks, _registry
from ... import nf4 as _nf4
from . import _native

# Outputs at least this large get transparent huge pages requested before their first touch.
_HUGE_MIN_BYTES = 8 << 20


# ------------------------------------------------------------------------------------------
# torch fallback for dequantize
# ------------------------------------------------------------------------------------------

_PAIRS: torch.Tensor | None = None
_CHUNK_BYTES = 1 << 14  # packed bytes per chunk: ~128 KiB of float32 pairs, stays in L2


def _nf4_pairs_int64() -> torch.Tensor:
    """int64 [256]: each entry holds the float32 pair (code[byte >> 4], code[byte & 15])."""
    global _PAIRS
    if _PAIRS is None:
        code = _nf4.NF4_CODE
        pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()
        _PAIRS = pairs.view(torch.int64).reshape(256)
    return _PAIRS


def _torch_path_ok(n: int, blocksize: int) -> bool:
    return not (blocksize % 2 or n % blocksize or n % 2)


def _nf4_dequantize_torch(packed, absmax, blocksize, shape, dtype, out=None):
    n = math.prod(int(d) for d in shape)
    if not _torch_path_ok(n, blocksize):
        ref = _nf4.nf4_dequantize_reference(packed, absmax, blocksize, shape, dtype)
        return ref if out is None else out.view(tuple(shape)).copy_(ref)
    p = packed.reshape(-1)
    out = torch.empty(n, dtype=dtype) if out is None else out.view(-1)
    pairs = _nf4_pairs_int64()
    half = blocksize // 2
    chunk = max(_CHUNK_BYTES // half, 1) * half  # whole blocks per chunk
    absmax = absmax.reshape(-1, 1)
    for s in range(0, p.numel(), chunk):
        idx = p[s : s + chunk].to(torch.int32)
        vals = torch.index_select(pairs, 0, idx).view(torch.float32).view(-1, blocksize)
        b0 = (2 * s) // blocksize
        torch.mul(vals, absmax[b0 : b0 + vals.shape[0]], out=out[2 * s : 2 * s + vals.numel()].view(-1, blocksize))
    return out.view(tuple(shape))


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------


def empty_output(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype)``, with huge pages requested for large buffers before their first
    touch (Linux, native kernels only; see ``advise_hugepages`` in nf4.cpp)."""
    out = torch.empty(tuple(shape), dtype=dtype)
    if out.nbytes >= _HUGE_MIN_BYTES:
        ops = _native.native_ops()
        if ops is not None:
            ops.advise_hugepages(out)
    return out


def _native_for(*dtypes: torch.dtype):
    """The native ops when they are available and support every dtype given, else None."""
    if not all(dtype in _checks.FLOAT_DTYPES for dtype in dtypes):
        return None
    return _native.native_ops()


def nf4_dequantize_cpu(packed, absmax, blocksize, shape, dtype):
    ops = _native_for(dtype)
    if ops is None:
        return _nf4_dequantize_torch(packed, absmax, blocksize, shape, dtype)
    out = empty_output(shape, dtype)
    ops.nf4_dequantize(packed.contiguous(), absmax.to(torch.float32).contiguous(), _nf4.nf4_code("cpu"), blocksize, out)
    return out


def nf4_dequantize_into(packed, absmax, blocksize, shape, dtype, out: torch.Tensor) -> torch.Tensor:
    """:func:`nf4_dequantize_cpu` written into ``out`` (a contiguous CPU tensor of ``prod(shape)``
    elements of ``dtype``, e.g. a reused workspace) instead of a new tensor; returns ``out`` viewed
    as ``shape``. Same values, bit for bit, as ``nf4_dequantize_cpu``."""
    n = math.prod(int(d) for d in shape)
    if out.dtype != dtype or out.numel() != n or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"out: expected a contiguous cpu tensor of {n} {dtype}, got {tuple(out.shape)} {out.dtype}")
    ops = _native_for(dtype)
    if ops is None:
        return _nf4_dequantize_torch(packed, absmax, blocksize, shape, dtype, out=out)
    ops.nf4_dequantize(packed.contiguous(), absmax.to(torch.float32).contiguous(), _nf4.nf4_code("cpu"), blocksize, out)
    return out.view(tuple(shape))


def nf4_quantize_cpu(A, blocksize):
    ops = _native_for(A.dtype)
    if ops is None:
        return _nf4.nf4_quantize_reference(A, blocksize)
    n = A.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32)
    ops.nf4_quantize(A.contiguous(), _nf4.nf4_bounds("cpu"), blocksize, packed, absmax)
    return packed, absmax


_LUT_CACHE: dict[bytes, torch.Tensor] = {}


def _lut_for(code: torch.Tensor) -> torch.Tensor:
    """uint8 [65536] lookup table of ``code`` (cached for the last few code maps)."""
    key = code.to(torch.float32).contiguous().numpy().tobytes()
    lut = _LUT_CACHE.get(key)
    if lut is None:
        if len(_LUT_CACHE) > 8:
            _LUT_CACHE.clear()
        lut = _LUT_CACHE[key] = _nf4._lut_8bit(code.to(torch.float32)).contiguous()
    return lut


def quantize_blockwise_8bit_cpu(A, code, blocksize):
    ops = _native_for(A.dtype)
    if ops is None:
        return _nf4.quantize_blockwise_8bit_reference(A, code, blocksize)
    q = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty((-(-A.numel() // blocksize),), dtype=torch.float32)
    ops.quantize_blockwise_8bit(A.contiguous(), _lut_for(code), blocksize, q, absmax)
    return q, absmax


def dequantize_blockwise_8bit_cpu(q, absmax, code, blocksize, dtype):
    ops = _native_for(dtype)
    if ops is None:
        return _nf4.dequantize_blockwise_8bit_reference(q, absmax, code, blocksize, dtype)
    out = empty_output(q.shape, dtype)
    code = code.to(torch.float32).contiguous()
    ops.dequantize_blockwise_8bit(q.contiguous(), absmax.to(torch.float32).contiguous(), code, blocksize, out)
    return out


KERNELS: _registry.KernelTable = {
    "nf4_quantize": nf4_quantize_cpu,
    "nf4_dequantize": nf4_dequantize_cpu,
    "quantize_blockwise_8bit": quantize_blockwise_8bit_cpu,
    "dequantize_blockwise_8bit": dequantize_blockwise_8bit_cpu,
}

