"""Triton kernels for NF4 (4-bit NormalFloat) and 8-bit blockwise quantization.

Storage format (byte-for-byte that of bitsandbytes, so a weight quantized on one device loads on
any other):

* NF4: ``packed`` uint8 ``[(numel + 1) // 2, 1]``; element ``2i`` sits in the high nibble of byte
  ``i`` and element ``2i + 1`` in the low nibble (an odd tail is padded with code 7, i.e. 0.0).
  ``absmax`` fp32 ``[ceil(numel / blocksize)]``; the last block may be partial.
* 8-bit blockwise: ``q`` uint8 shaped like the input, ``absmax`` fp32 per block, values looked up in
  a sorted 256-entry ``code`` table (double quantization of the NF4 absmax uses it).

NF4 quantization follows bitsandbytes' CPU path exactly: ``scaled = clamp(x * (1 / absmax), -1, 1)``
for full blocks and ``clamp(x / absmax, -1, 1)`` for the partial tail block (whose absmax is clamped
to at least 1e-38, also in storage), then the code index is the number of midpoints
``(code[i] + code[i+1]) / 2`` strictly below ``scaled`` (``torch.bucketize`` with ``right=False``: a
value on a midpoint goes to the lower code). 8-bit quantization reads bitsandbytes' 65536-entry
lookup table (see :func:`quantize_blockwise_8bit`). Divisions use ``div_rn`` and the 8-bit kernel
launches without FMA contraction, so the GPU rounds exactly like the CPU reference.

Every kernel upcasts its loads to fp32 at once (Triton's interpreter computes bf16 arithmetic
wrongly, and fp32 is what the reference computes in), and masks every load and store, so any
numel works, divisible by the block or not.

The launchers (:func:`nf4_quantize`, :func:`nf4_dequantize`, :func:`quantize_blockwise_8bit`,
:func:`dequantize_blockwise_8bit`) take exactly the arguments of the ``npu_ft`` ops of the same
names; :func:`register` registers them on the CUDA dispatch key. They also run on CPU tensors under
``TRITON_INTERPRET=1``, which is how CI tests them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from npu_ft.ops import _registry

from ... import nf4 as _nf4
from ._common import needs_bf16_rounding, round_to_bf16_rne

#: The 16 NF4 values (QLoRA paper, as stored by bitsandbytes), sorted ascending.
NF4_CODE_VALUES = _nf4._NF4_VALUES

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _nf4_code(device: torch.device) -> torch.Tensor:
    key = ("code", device)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)
    return _TABLES[key]


def _nf4_bounds(device: torch.device) -> torch.Tensor:
    key = ("bounds", device)
    if key not in _TABLES:
        code = _nf4_code(device)
        _TABLES[key] = ((code[:-1] + code[1:]) / 2).contiguous()  # fp32, as the reference computes it
    return _TABLES[key]


def _check_blocksize(blocksize: int, even: bool) -> None:
    if blocksize <= 0:
        raise ValueError(f"blocksize: must be positive, got {blocksize}")
    if even and blocksize % 2:
        raise ValueError(f"blocksize: must be even for NF4 (two values per byte), got {blocksize}")


def _rows_per_program(block_elems: int, target: int = 4096) -> int:
    """How many quantization blocks one program handles: about ``target`` elements per tile."""
    return max(1, min(64, triton.next_power_of_2(max(1, target // block_elems))))


# ----------------------------------------------------------------------------------------------
# NF4
# ----------------------------------------------------------------------------------------------


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    # BLOCKSIZE is a compile-time constant (a power of two in practice, so // is a shift).
    # One program writes BLOCK consecutive output elements; element e reads byte e // 2
    # (high nibble for even e, low nibble for odd e) and absmax[e // blocksize].
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where((offs % 2) == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0).to(tl.float32)
    result = value * scale
    if RNE_BF16:
        result = round_to_bf16_rne(result)
    tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_quantize_kernel(
    a_ptr,
    bounds_ptr,
    packed_ptr,
    absmax_ptr,
    n,
    n_blocks,
    blocksize,
    ROWS: tl.constexpr,
    HALF: tl.constexpr,
):
    # A tile of ROWS quantization blocks x HALF byte columns (HALF >= blocksize // 2). Column j of
    # block r holds elements r * blocksize + 2j (high nibble) and + 2j + 1 (low nibble).
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HALF)
    row_ok = rows < n_blocks
    col_ok = cols < (blocksize // 2)
    first = rows[:, None] * blocksize + 2 * cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    even_ok = ok & (first < n)
    odd_ok = ok & ((first + 1) < n)
    x_even = tl.load(a_ptr + first, mask=even_ok, other=0.0).to(tl.float32)
    x_odd = tl.load(a_ptr + first + 1, mask=odd_ok, other=0.0).to(tl.float32)

    absmax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
    safe = tl.maximum(absmax, 1e-38)
    partial = ((rows + 1) * blocksize) > n  # only the last block can be partial
    # bitsandbytes stores the partial tail block's absmax clamped, the full blocks' as they are
    tl.store(absmax_ptr + rows, tl.where(partial, safe, absmax), mask=row_ok)

    inv = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    s_even = tl.where(
        partial[:, None], tl.math.div_rn(x_even, safe[:, None]), x_even * inv[:, None]
    )
    s_odd = tl.where(partial[:, None], tl.math.div_rn(x_odd, safe[:, None]), x_odd * inv[:, None])
    s_even = tl.minimum(tl.maximum(s_even, -1.0), 1.0)
    s_odd = tl.minimum(tl.maximum(s_odd, -1.0), 1.0)

    # code index = number of midpoints strictly below the value (15 midpoints, sorted)
    q_even = tl.zeros(s_even.shape, tl.int32)
    q_odd = tl.zeros(s_odd.shape, tl.int32)
    for i in tl.static_range(15):
        b = tl.load(bounds_ptr + i)
        q_even += (s_even > b).to(tl.int32)
        q_odd += (s_odd > b).to(tl.int32)
    # an odd tail is padded with 0.0 (index 7), as bitsandbytes does
    q_odd = tl.where(odd_ok, q_odd, 7)
    byte = ((q_even << 4) | q_odd).to(tl.uint8)
    tl.store(packed_ptr + first // 2, byte, mask=even_ok)


def nf4_quantize(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize ``A`` (any shape, fp32/bf16/fp16) in blocks of ``blocksize`` (even).

    Returns ``(packed uint8 [(numel + 1) // 2, 1], absmax fp32 [ceil(numel / blocksize)])``,
    byte-identical to ``bitsandbytes.functional.quantize_4bit(A, blocksize=..., quant_type="nf4")``
    without double quantization.
    """
    _check_blocksize(blocksize, even=True)
    a = A.contiguous().reshape(-1)
    n = a.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=A.device)
    absmax = torch.empty((n_blocks,), dtype=torch.float32, device=A.device)
    if n == 0:
        return packed, absmax
    half = triton.next_power_of_2(blocksize // 2)
    rows = _rows_per_program(2 * half)
    grid = (triton.cdiv(n_blocks, rows),)
    _nf4_quantize_kernel[grid](
        a, _nf4_bounds(A.device), packed, absmax, n, n_blocks, blocksize, ROWS=rows, HALF=half
    )
    return packed, absmax


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize NF4 ``packed``/``absmax`` to a ``dtype`` tensor of ``shape``.

    ``out`` (contiguous, ``shape``, ``dtype``) may be given to reuse a workspace; the op itself never
    passes it.
    """
    _check_blocksize(blocksize, even=False)
    n = math.prod(int(s) for s in shape)
    if out is None:
        out = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=packed.device)
    elif not out.is_contiguous() or out.numel() != n or out.dtype != dtype:
        raise ValueError("out: must be a contiguous workspace with the requested numel and dtype")
    if n == 0:
        return out
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    packed = packed.contiguous().reshape(-1)
    if packed.numel() < (n + 1) // 2:
        raise ValueError(f"packed: holds {packed.numel() * 2} values, shape needs {n}")
    absmax = absmax.contiguous().reshape(-1)
    block = 1024
    grid = (triton.cdiv(n, block),)
    _nf4_dequantize_kernel[grid](
        packed, absmax, _nf4_code(packed.device), out, n, BLOCKSIZE=blocksize, BLOCK=block,
        RNE_BF16=needs_bf16_rounding(dtype),
    )
    return out


# ----------------------------------------------------------------------------------------------
# 8-bit blockwise (double quantization of the NF4 absmax)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_blockwise_8bit_kernel(
    q_ptr,
    absmax_ptr,
    code_ptr,
    out_ptr,
    n,
    blocksize,
    BLOCK: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    value = tl.load(code_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(absmax_ptr + offs // blocksize, mask=mask, other=0.0).to(tl.float32)
    result = value * scale
    if RNE_BF16:
        result = round_to_bf16_rne(result)
    tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_blockwise_8bit_kernel(
    a_ptr,
    lut_ptr,
    q_ptr,
    absmax_ptr,
    n,
    n_blocks,
    blocksize,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    row_ok = rows < n_blocks
    offs = rows[:, None] * blocksize + cols[None, :]
    ok = row_ok[:, None] & (cols[None, :] < blocksize) & (offs < n)
    x = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)

    store_blockwise_8bit(x, row_ok, ok, rows, offs, absmax_ptr, lut_ptr, q_ptr)


@triton.jit
def store_blockwise_8bit(x, row_ok, ok, rows, offs, absmax_ptr, lut_ptr, q_ptr):
    """Quantize fp32 ``x`` [ROWS, COLS] row by row (one block per row): store each row's absmax at
    ``absmax_ptr + rows`` and its 8-bit codes (from the 65536-entry table) at ``q_ptr + offs``."""
    absmax = tl.max(tl.abs(x), axis=1)
    tl.store(absmax_ptr + rows, absmax, mask=row_ok)
    zero = absmax == 0.0
    inv = tl.where(zero, 0.0, tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(zero, 1.0, absmax)))
    s = x * inv[:, None]
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    # index into the 65536-entry table, rounding step by step as the reference does (the launch
    # disables FMA contraction so the GPU rounds every step too)
    t = ((s + 1.0) * 0.5) * 65535.0 + 0.5
    idx = t.to(tl.int32)
    code = tl.load(lut_ptr + idx, mask=ok, other=0)
    code = tl.where(zero[:, None], 0, code)  # an all-zero block stores code 0
    tl.store(q_ptr + offs, code.to(tl.uint8), mask=ok)


LUT_SIZE = 65536


def lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """uint8 [65536]: code index of each point ``-1 + 2 i / 65535`` (bitsandbytes' CPU table).

    Entry ``i`` counts the midpoints between neighbouring (ascending) codes strictly below the point:
    the nearest code, a tie going to the lower one.
    """
    code = code.to(torch.float32)
    mids = (0.5 * (code[:-1] + code[1:])).contiguous()
    points = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)
    points = -1.0 + (2.0 * points) / float(LUT_SIZE - 1)
    return torch.searchsorted(mids, points, right=False).to(torch.uint8)


def quantize_blockwise_8bit(
    A: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with an ascending ``code`` table (<= 256 entries).

    Returns ``(q uint8 shaped like A, absmax fp32 [ceil(numel / blocksize)])``, bit-identical to
    bitsandbytes' CPU kernel (and :func:`npu_ft.ops.nf4.quantize_blockwise_8bit_reference`): each
    block is scaled by ``x * (1 / absmax)`` (the tail block too), and the code is read from a
    65536-entry table of the nearest code at evenly spaced points in [-1, 1], so a value within
    ~1.5e-5 of a midpoint may take the neighbouring code. All-zero blocks store code 0.
    """
    _check_blocksize(blocksize, even=False)
    if code.numel() > 256:
        raise ValueError(f"code: at most 256 entries for 8-bit codes, got {code.numel()}")
    a = A.contiguous().reshape(-1)
    n = a.numel()
    n_blocks = -(-n // blocksize)
    q = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty((n_blocks,), dtype=torch.float32, device=A.device)
    if n == 0:
        return q, absmax
    lut = lut_8bit(code.to(A.device))
    cols = triton.next_power_of_2(blocksize)
    rows = _rows_per_program(cols)
    grid = (triton.cdiv(n_blocks, rows),)
    _quantize_blockwise_8bit_kernel[grid](
        a, lut, q, absmax, n, n_blocks, blocksize, ROWS=rows, COLS=cols, enable_fp_fusion=False,
    )
    return q, absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """``code[q] * absmax[block]`` in fp32, cast to ``dtype``; shaped like ``q``."""
    _check_blocksize(blocksize, even=False)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n = q.numel()
    if n == 0:
        return out
    code32 = code.to(device=q.device, dtype=torch.float32).contiguous().reshape(-1)
    block = 1024
    _dequantize_blockwise_8bit_kernel[(triton.cdiv(n, block),)](
        q.contiguous().reshape(-1), absmax.contiguous().reshape(-1), code32, out, n, blocksize,
        BLOCK=block, RNE_BF16=needs_bf16_rounding(dtype),
    )
    return out


# ----------------------------------------------------------------------------------------------


def _nf4_dequantize_op(packed, absmax, blocksize, shape, dtype):
    return nf4_dequantize(packed, absmax, blocksize, shape, dtype)


KERNELS: _registry.KernelTable = {
    "nf4_quantize": nf4_quantize,
    "nf4_dequantize": _nf4_dequantize_op,
    "quantize_blockwise_8bit": quantize_blockwise_8bit,
    "dequantize_blockwise_8bit": dequantize_blockwise_8bit,
}

