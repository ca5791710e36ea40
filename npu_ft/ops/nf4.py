"""NF4 (4-bit NormalFloat) and 8-bit blockwise quantization, byte-compatible with bitsandbytes 0.50.

Storage format (identical to ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``):

* The weight is flattened (row-major) and cut into blocks of ``blocksize`` values (32 ... 4096, a
  power of two; default 64). The last block may be shorter.
* ``absmax`` (float32, ``[ceil(numel / blocksize)]``) holds each block's largest ``|value|``; each
  value is divided by it and mapped to the nearest of the 16 :data:`NF4_CODE` values (a value on a
  midpoint goes to the lower code).
* Two 4-bit codes share one byte, the even element in the **high** nibble; the packed tensor is
  uint8 ``[(numel + 1) // 2, 1]``. An odd numel leaves a padding code (7, the code of 0.0) in the
  low nibble of the last byte.
* Double quantization ("nested", ``compress_statistics=True`` in bitsandbytes): ``offset =
  absmax.mean()`` and ``absmax - offset`` is quantized with 8-bit blockwise quantization (signed
  dynamic code map, :func:`dynamic_code_8bit`, nested blocksize 256).

Ops (``torch.ops.npu_ft.*``; each has a fake kernel and a pure-torch reference kernel that serves
any device; faster kernels live in ``npu_ft/ops/backends/<device>/nf4.py``):

* ``nf4_quantize(Tensor A, int blocksize) -> (Tensor packed, Tensor absmax)``
* ``nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, ScalarType dtype) -> Tensor``
* ``quantize_blockwise_8bit(Tensor A, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)``
* ``dequantize_blockwise_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor``

Exactness notes. The reference kernels reproduce what bitsandbytes 0.50 computes on CPU, bit for
bit: for NF4, full blocks are scaled by ``x * (1 / absmax)`` and the last partial block by
``x / absmax`` (its stored absmax is clamped to at least 1e-38); the 8-bit quantizer maps each
scaled value through bitsandbytes' 65536-entry lookup table. bitsandbytes' CUDA kernels can differ
from its CPU path in the last bit of rare ties (8-bit codes in particular); any of them loads
correctly, since dequantization is the same everywhere.

Python API (arguments checked before any kernel runs): :func:`quantize_nf4`, :func:`dequantize_nf4`,
:class:`Nf4QuantState`, :func:`nf4_quantize`, :func:`nf4_dequantize`,
:func:`quantize_blockwise_8bit`, :func:`dequantize_blockwise_8bit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import _checks, _registry

__all__ = [
    "BLOCKSIZES_4BIT",
    "BLOCKSIZES_8BIT",
    "NESTED_BLOCKSIZE",
    "NF4_CODE",
    "Nf4QuantState",
    "dequantize_blockwise_8bit",
    "dequantize_blockwise_8bit_reference",
    "dequantize_nf4",
    "dynamic_code_8bit",
    "nf4_dequantize",
    "nf4_dequantize_reference",
    "nf4_quantize",
    "nf4_quantize_reference",
    "quantize_blockwise_8bit",
    "quantize_blockwise_8bit_reference",
    "quantize_nf4",
]

#: block sizes bitsandbytes accepts for 4-bit quantization
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: block sizes bitsandbytes documents for 8-bit blockwise quantization
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
#: block size of the double-quantized absmax (bitsandbytes' fixed choice)
NESTED_BLOCKSIZE = 256

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1] (QLoRA, Dettmers et al. 2023), as the
# float32 values bitsandbytes stores in every checkpoint's ``quant_map``.
_NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: the 16 NF4 code values, float32 [16], ascending (index = 4-bit code)
NF4_CODE = torch.tensor(_NF4_VALUES, dtype=torch.float32)

# The pad value of the 0.0 code; an odd numel leaves it in the last byte's low nibble.
_NF4_ZERO_CODE = 7
# Clamp bitsandbytes applies to the divisor of all-zero blocks (float32 rounds it to a subnormal).
_TINY = 1e-38
# Entries of the 8-bit quantization lookup table (bitsandbytes' CPU kernel: uint16 index space).
_LUT_SIZE = 65536

_CACHE: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, build) -> torch.Tensor:
    value = _CACHE.get(key)
    if value is None:
        value = _CACHE[key] = build()
    return value


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """:data:`NF4_CODE` on ``device`` (cached; do not modify it in place)."""
    device = torch.device(device or "cpu")
    return _cached(("nf4_code", device), lambda: NF4_CODE.to(device))


def nf4_bounds(device: torch.device | str | None = None) -> torch.Tensor:
    """The 15 float32 midpoints between neighbouring NF4 codes: code ``i`` covers ``(bounds[i-1], bounds[i]]``."""
    device = torch.device(device or "cpu")

    def build():
        code = NF4_CODE
        return ((code[:-1] + code[1:]) / 2).to(device)

    return _cached(("nf4_bounds", device), build)


def _build_dynamic_code(signed: bool = True) -> torch.Tensor:
    # Dynamic map (Dettmers 2015, "8-bit approximations for parallelism"), 8 bits, up to 7 exponent
    # bits: for exponent e = 0..6 the decade 10**(e-6) gets 2**e linearly spaced mantissas
    # (midpoints of linspace(0.1, 1, 2**e + 1)) with both signs - or, unsigned, 2**(e+1) mantissas
    # of one sign (bitsandbytes' create_dynamic_map(signed=False)); plus 0 and 1.
    values: list[float] = []
    for e in range(7):
        count = 2**e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values.extend(((10 ** (e - 6)) * mids).tolist())
        if signed:
            values.extend((-(10 ** (e - 6)) * mids).tolist())
    values.extend([0.0, 1.0])
    assert len(values) == 256
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_code_8bit(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code map, float32 [256], ascending, in [-0.993, 1].

    Cached per device: do not modify the returned tensor in place (clone it first).
    """
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        return _cached(("dynamic8", device), lambda: dynamic_code_8bit("cpu").to(device))
    return _cached(("dynamic8", device), _build_dynamic_code)


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """uint8 [65536]: code index for each point ``-1 + 2 i / 65535`` (bitsandbytes CPU table).

    Entry ``i`` is the number of midpoints between neighbouring codes that lie strictly below the
    point, i.e. the nearest code with ties going to the lower one. ``code`` must be ascending.
    """
    code = code.to(torch.float32)
    mids = 0.5 * (code[:-1] + code[1:])
    points = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    points = -1.0 + (2.0 * points) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mids.contiguous(), points, right=False).to(torch.uint8)


def _lut_index_8bit(scaled: torch.Tensor) -> torch.Tensor:
    """int32 index into :func:`_lut_8bit` for values already scaled to [-1, 1] (float32)."""
    t = scaled.clamp(-1.0, 1.0).add_(1.0).mul_(0.5).mul_(float(_LUT_SIZE - 1)).add_(0.5)
    return t.to(torch.int32)


def _num_blocks(numel, blocksize):
    return (numel + blocksize - 1) // blocksize


# --------------------------------------------------------------------------------------------
# Op schemas and fake kernels
# --------------------------------------------------------------------------------------------

# Tolerances: codes and packed bytes must match the oracle exactly; dequantized values are within
# the default float table (the oracle computes them in float32; a kernel returns them in ``dtype``).
_registry.define("nf4_quantize(Tensor A, int blocksize) -> (Tensor, Tensor)", tolerances=_registry.EXACT)
_registry.define(
    "nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, ScalarType dtype) -> Tensor"
)
_registry.define(
    "quantize_blockwise_8bit(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)", tolerances=_registry.EXACT
)
_registry.define(
    "dequantize_blockwise_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor"
)


def _nf4_quantize_fake(A: torch.Tensor, blocksize: int):
    n = A.numel()
    packed = A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = A.new_empty((_num_blocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


def _nf4_dequantize_fake(packed, absmax, blocksize, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


def _quantize_blockwise_8bit_fake(A, code, blocksize):
    q = A.new_empty(A.shape, dtype=torch.uint8)
    absmax = A.new_empty((_num_blocks(A.numel(), blocksize),), dtype=torch.float32)
    return q, absmax


def _dequantize_blockwise_8bit_fake(q, absmax, code, blocksize, dtype):
    return q.new_empty(q.shape, dtype=dtype)


_registry.register_fake("nf4_quantize", _nf4_quantize_fake)
_registry.register_fake("nf4_dequantize", _nf4_dequantize_fake)
_registry.register_fake("quantize_blockwise_8bit", _quantize_blockwise_8bit_fake)
_registry.register_fake("dequantize_blockwise_8bit", _dequantize_blockwise_8bit_fake)


# --------------------------------------------------------------------------------------------
# Reference kernels (pure torch, any device). Callable directly; no argument checks.
# --------------------------------------------------------------------------------------------


def scale_blocks_nf4(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` scaled block by block into [-1, 1], with bitsandbytes' CPU arithmetic.

    Returns ``scaled`` float32 ``[numel]`` and ``absmax`` float32 ``[ceil(numel / blocksize)]``.
    Full blocks are multiplied by ``1 / absmax``; the last partial block is divided by its absmax,
    which is clamped to at least 1e-38 (what bitsandbytes 0.50 computes, bit for bit).
    """
    flat = A.reshape(-1).to(torch.float32)
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(full // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).clamp_(-1.0, 1.0).reshape(-1)
    if rem:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, (tail / tail_absmax).clamp_(-1.0, 1.0)])
    return scaled, absmax


def nf4_quantize_reference(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize ``A`` (float32/bfloat16/float16, any shape, numel >= 1).

    Returns ``packed`` uint8 ``[(numel + 1) // 2, 1]`` (high nibble = even element) and ``absmax``
    float32 ``[ceil(numel / blocksize)]``.
    """
    scaled, absmax = scale_blocks_nf4(A, blocksize)
    n = scaled.numel()
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # 0.0 -> the 0.0 code (7)
    q = torch.bucketize(scaled, nf4_bounds(A.device), out_int32=True).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed.unsqueeze(1), absmax


def nf4_dequantize_reference(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`nf4_quantize_reference`: ``code * absmax`` in float32, then cast to ``dtype``.

    ``packed`` uint8 with ``(prod(shape) + 1) // 2`` elements; ``absmax`` float32
    ``[ceil(prod(shape) / blocksize)]``. Returns ``dtype`` tensor of ``shape``.
    """
    n = math.prod(shape)
    nblocks = _num_blocks(n, blocksize)
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    values = nf4_code(packed.device)[codes]
    if nblocks * blocksize != n:
        values = torch.nn.functional.pad(values, (0, nblocks * blocksize - n))
    values = values.view(nblocks, blocksize) * absmax.reshape(nblocks, 1).to(torch.float32)
    return values.reshape(-1)[:n].to(dtype).reshape(tuple(shape))


def quantize_blockwise_8bit_reference(
    A: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of ``A`` (float, any shape) with the 256-entry ascending ``code``.

    Returns ``q`` uint8 of ``A.shape`` and ``absmax`` float32 ``[ceil(numel / blocksize)]``. A block
    whose absmax is 0 quantizes to code index 0 (as bitsandbytes does).
    """
    flat = A.reshape(-1).to(torch.float32)
    n = flat.numel()
    nblocks = _num_blocks(n, blocksize)
    if nblocks * blocksize != n:
        flat = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n))
    blocks = flat.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)  # 0-blocks: no inf * 0
    scaled = blocks * inv.unsqueeze(1)
    q = _lut_8bit(code.to(A.device))[_lut_index_8bit(scaled).long()]
    q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].reshape(A.shape), absmax


def dequantize_blockwise_8bit_reference(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit_reference`: ``code[q] * absmax`` (float32) cast to ``dtype``."""
    flat = q.reshape(-1)
    n = flat.numel()
    nblocks = _num_blocks(n, blocksize)
    values = code.to(device=q.device, dtype=torch.float32)[flat.long()]
    if nblocks * blocksize != n:
        values = torch.nn.functional.pad(values, (0, nblocks * blocksize - n))
    values = values.view(nblocks, blocksize) * absmax.reshape(nblocks, 1).to(torch.float32)
    return values.reshape(-1)[:n].to(dtype).reshape(q.shape)


_registry.register_reference("nf4_quantize", nf4_quantize_reference)
_registry.register_reference("nf4_dequantize", nf4_dequantize_reference)
_registry.register_reference("quantize_blockwise_8bit", quantize_blockwise_8bit_reference)
_registry.register_reference("dequantize_blockwise_8bit", dequantize_blockwise_8bit_reference)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_blocksize(name: str, blocksize, allowed: tuple[int, ...]) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name}: expected an int, got {type(blocksize).__name__}")
    if blocksize not in allowed:
        raise ValueError(f"{name}: {blocksize} not supported (expected a power of two in {allowed[0]}..{allowed[-1]})")
    return blocksize


def _check_float_dtype(name: str, dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}: expected a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(
            f"{name}: {str(dtype).replace('torch.', '')} not supported (expected float32, bfloat16, float16)"
        )
    return dtype


def _check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name}: must have at least one element, got shape {tuple(t.shape)}")


def _check_shape(name: str, shape) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of ints, got {type(shape).__name__}") from None
    if any(d < 0 for d in dims) or math.prod(dims) == 0:
        raise ValueError(f"{name}: {dims} must have positive dimensions")
    return dims


def _check_numel(name: str, t: torch.Tensor, expected: int, what: str) -> None:
    if t.numel() != expected:
        raise ValueError(f"{name}: has {t.numel()} elements, expected {expected} ({what})")


def _check_code(name: str, code, ref_name: str, ref: torch.Tensor) -> None:
    code = _checks.check_tensor(name, code, dtypes=(torch.float32,))
    _check_numel(name, code, 256, "the 8-bit code map")
    _checks.check_same_device(ref_name, ref, **{name: code})


# --------------------------------------------------------------------------------------------
# Checked entry points for the ops
# --------------------------------------------------------------------------------------------


def nf4_quantize(A: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize ``A`` (float32/bfloat16/float16, any shape, numel >= 1).

    Returns ``packed`` uint8 ``[(numel + 1) // 2, 1]`` and ``absmax`` float32 ``[ceil(numel / blocksize)]``.
    """
    _checks.check_tensor("A", A, dtypes=_checks.FLOAT_DTYPES)
    _check_nonempty("A", A)
    _check_blocksize("blocksize", blocksize, BLOCKSIZES_4BIT)
    return torch.ops.npu_ft.nf4_quantize(A.detach(), blocksize)


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize NF4 ``packed`` (uint8, ``(prod(shape)+1)//2`` elements) with float32 ``absmax``
    ``[ceil(prod(shape)/blocksize)]``; returns a ``dtype`` tensor of ``shape``."""
    _checks.check_tensor("packed", packed, dtypes=(torch.uint8,))
    _checks.check_tensor("absmax", absmax, dtypes=(torch.float32,))
    _check_blocksize("blocksize", blocksize, BLOCKSIZES_4BIT)
    shape = _check_shape("shape", shape)
    _check_float_dtype("dtype", dtype)
    n = math.prod(shape)
    _check_numel("packed", packed, (n + 1) // 2, f"two 4-bit codes per byte for shape {shape}")
    _check_numel("absmax", absmax, _num_blocks(n, blocksize), f"one per block of {blocksize} for shape {shape}")
    _checks.check_same_device("packed", packed, absmax=absmax)
    return torch.ops.npu_ft.nf4_dequantize(packed, absmax, blocksize, list(shape), dtype)


def quantize_blockwise_8bit(
    A: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of ``A`` (float32/bfloat16/float16, numel >= 1).

    ``code``: float32 [256] ascending (default :func:`dynamic_code_8bit`). Returns ``q`` uint8 of
    ``A.shape`` and ``absmax`` float32 ``[ceil(numel / blocksize)]``.
    """
    _checks.check_tensor("A", A, dtypes=_checks.FLOAT_DTYPES)
    _check_nonempty("A", A)
    if code is None:
        code = dynamic_code_8bit(A.device)
    _check_code("code", code, "A", A)
    _check_blocksize("blocksize", blocksize, BLOCKSIZES_8BIT)
    return torch.ops.npu_ft.quantize_blockwise_8bit(A.detach(), code, blocksize)


def dequantize_blockwise_8bit(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None = None,
    blocksize: int = NESTED_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``code[q] * absmax`` per block: ``q`` uint8 (any shape), ``absmax`` float32
    ``[ceil(q.numel() / blocksize)]``, ``code`` float32 [256]; returns ``dtype`` of ``q.shape``."""
    _checks.check_tensor("q", q, dtypes=(torch.uint8,))
    _check_nonempty("q", q)
    _checks.check_tensor("absmax", absmax, dtypes=(torch.float32,))
    if code is None:
        code = dynamic_code_8bit(q.device)
    _check_code("code", code, "q", q)
    _check_blocksize("blocksize", blocksize, BLOCKSIZES_8BIT)
    _check_float_dtype("dtype", dtype)
    _check_numel("absmax", absmax, _num_blocks(q.numel(), blocksize), f"one per block of {blocksize}")
    _checks.check_same_device("q", q, absmax=absmax)
    return torch.ops.npu_ft.dequantize_blockwise_8bit(q, absmax, code, blocksize, dtype)


# --------------------------------------------------------------------------------------------
# Quantization state and the bitsandbytes state-dict format
# --------------------------------------------------------------------------------------------

_BNB_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_BNB_PACKED_KEY = "quant_state.bitsandbytes__nf4"
_BNB_KEYS = set(_BNB_TENSOR_KEYS) | {
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{key}: unknown dtype {name!r}")
    return dtype


@dataclasses.dataclass
class Nf4QuantState:
    """Everything needed to dequantize an NF4 weight besides its packed bytes.

    Plain form: ``absmax`` float32 ``[num_blocks]``.
    Nested (double-quantized) form: ``qabsmax`` uint8 ``[num_blocks]`` = 8-bit codes of
    ``absmax - offset``, ``nested_absmax`` float32 ``[ceil(num_blocks / nested_blocksize)]``,
    ``nested_code`` float32 [256] (the dynamic map), ``offset`` float32 0-dim.

    ``num_blocks = ceil(prod(shape) / blocksize)``; ``dtype`` is the original weight's dtype.
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax: torch.Tensor | None = None
    qabsmax: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    offset: torch.Tensor | None = None

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if (self.absmax is None) == (self.qabsmax is None):
            raise ValueError("absmax: give exactly one of absmax (plain) or qabsmax (nested)")
        if self.nested and any(v is None for v in (self.nested_absmax, self.nested_code, self.offset)):
            raise ValueError("nested_absmax: a nested state needs qabsmax, nested_absmax, nested_code and offset")

    @property
    def nested(self) -> bool:
        return self.qabsmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return _num_blocks(self.numel, self.blocksize)

    @property
    def stored_absmax(self) -> torch.Tensor:
        """What bitsandbytes stores as ``absmax``: float32 ``absmax``, or uint8 ``qabsmax`` when nested."""
        if self.qabsmax is not None:
            return self.qabsmax
        if self.absmax is not None:
            return self.absmax
        raise ValueError("absmax: give exactly one of absmax (plain) or qabsmax (nested)")

    @property
    def device(self) -> torch.device:
        return self.stored_absmax.device

    def nested_fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qabsmax, nested_absmax, nested_code, offset)`` of a nested state (ValueError if plain)."""
        qabsmax, nested_absmax, nested_code, offset = self.qabsmax, self.nested_absmax, self.nested_code, self.offset
        if qabsmax is None or nested_absmax is None or nested_code is None or offset is None:
            raise ValueError("qabsmax: not a nested (double-quantized) state")
        return qabsmax, nested_absmax, nested_code, offset

    def absmax_fp32(self) -> torch.Tensor:
        """float32 ``[num_blocks]``: ``absmax``, or for a nested state the dequantized
        ``qabsmax`` plus ``offset`` (bitsandbytes' order of operations)."""
        if not self.nested:
            return self.stored_absmax
        qabsmax, nested_absmax, nested_code, offset = self.nested_fields()
        absmax = dequantize_blockwise_8bit(qabsmax, nested_absmax, nested_code, self.nested_blocksize, torch.float32)
        return absmax + offset.to(absmax.device, torch.float32)

    def to(self, device) -> Nf4QuantState:
        """A copy with every tensor on ``device`` (bitsandbytes' ``QuantState.to`` works in place)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        return Nf4QuantState(**moved)

    # -- bitsandbytes format -------------------------------------------------------------------

    def to_bnb_dict(self, prefix: str = "", packed: bool = True) -> dict[str, Any]:
        """The entries bitsandbytes' ``QuantState.as_dict(packed=packed)`` produces, keys prefixed
        with ``prefix`` (e.g. ``"model.layers.0.mlp.up_proj.weight."``).

        ``packed=True`` (what transformers saves): tensors ``absmax`` (uint8 codes when nested),
        ``quant_map``, ``nested_absmax``, ``nested_quant_map`` and ``quant_state.bitsandbytes__nf4``
        (uint8 JSON of the non-tensor fields, byte-identical to bitsandbytes').
        """
        device = self.device
        fields: dict[str, Any] = {
            "quant_type": "nf4",
            "absmax": self.stored_absmax,
            "blocksize": self.blocksize,
            "quant_map": nf4_code(device).clone(),
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested:
            _, nested_absmax, nested_code, offset = self.nested_fields()
            fields.update(
                {
                    "nested_absmax": nested_absmax,
                    "nested_blocksize": self.nested_blocksize,
                    "nested_quant_map": nested_code.clone(),
                    "nested_dtype": "float32",
                    "nested_offset": float(offset.item()),
                }
            )
        if not packed:
            return {prefix + k: v for k, v in fields.items()}
        out = {prefix + k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}
        meta = {k: v for k, v in fields.items() if not isinstance(v, torch.Tensor)}
        raw = json.dumps(meta).encode("utf-8")
        out[prefix + _BNB_PACKED_KEY] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        return out

    @classmethod
    def from_bnb_dict(
        cls, state_dict: Mapping[str, Any], prefix: str = "", device: torch.device | str | None = None
    ) -> Nf4QuantState:
        """Read a quant state saved by bitsandbytes / transformers (packed or unpacked form).

        ``state_dict``: a full state dict or just the quant-state entries; only keys starting with
        ``prefix`` are read. Tensors go to ``device`` (default: where they are).
        """
        entries: dict[str, Any] = {}
        for key, value in state_dict.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            if name == _BNB_PACKED_KEY or name.startswith("quant_state.bitsandbytes__"):
                if name != _BNB_PACKED_KEY:
                    raise ValueError(f"{key}: only nf4 quant states are supported")
                if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
                    raise TypeError(f"{key}: expected a uint8 tensor of packed JSON")
                entries.update(json.loads(bytes(value.detach().cpu().reshape(-1).tolist()).decode("utf-8")))
            elif name in _BNB_KEYS:
                entries[name] = value
        missing = [k for k in ("quant_type", "absmax", "blocksize", "dtype", "shape") if k not in entries]
        if missing:
            raise ValueError(
                f"{prefix}{missing[0]}: missing from the bitsandbytes quant state (found {sorted(entries)})"
            )
        if entries["quant_type"] != "nf4":
            raise ValueError(f"{prefix}quant_type: {entries['quant_type']!r} not supported (only 'nf4')")
        if "quant_map" in entries:
            qmap = entries["quant_map"]
            if not torch.equal(qmap.detach().cpu().to(torch.float32).reshape(-1), NF4_CODE):
                raise ValueError(f"{prefix}quant_map: is not the NF4 code")

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device) if device is not None else t

        blocksize = int(entries["blocksize"])
        shape = torch.Size(int(d) for d in entries["shape"])
        dtype = _dtype_from_name(entries["dtype"], prefix + "dtype")
        absmax = entries["absmax"]
        if "nested_absmax" in entries:
            nested_code = entries.get("nested_quant_map")
            state = cls(
                shape=shape,
                dtype=dtype,
                blocksize=blocksize,
                qabsmax=dev(absmax),
                nested_absmax=dev(entries["nested_absmax"]).to(torch.float32),
                nested_code=dev(nested_code if nested_code is not None else dynamic_code_8bit()),
                nested_blocksize=int(entries.get("nested_blocksize", NESTED_BLOCKSIZE)),
                offset=dev(torch.tensor(float(entries["nested_offset"]), dtype=torch.float32)),
            )
        else:
            state = cls(shape=shape, dtype=dtype, blocksize=blocksize, absmax=dev(absmax))
        state.validate(prefix)
        return state

    def validate(self, prefix: str = "") -> None:
        """Raise ValueError/TypeError (message starts with the field name) if fields disagree."""
        _check_blocksize(prefix + "blocksize", self.blocksize, BLOCKSIZES_4BIT)
        _check_float_dtype(prefix + "dtype", self.dtype)
        nblocks = self.num_blocks
        if self.nested:
            qabsmax = _checks.check_tensor(prefix + "qabsmax", self.qabsmax, dtypes=(torch.uint8,))
            _check_numel(prefix + "qabsmax", qabsmax, nblocks, f"one per block of {self.blocksize}")
            _check_blocksize(prefix + "nested_blocksize", self.nested_blocksize, BLOCKSIZES_8BIT)
            nested_absmax = _checks.check_tensor(prefix + "nested_absmax", self.nested_absmax, dtypes=(torch.float32,))
            _check_numel(
                prefix + "nested_absmax",
                nested_absmax,
                _num_blocks(nblocks, self.nested_blocksize),
                f"one per block of {self.nested_blocksize} absmax codes",
            )
            _check_code(prefix + "nested_code", self.nested_code, prefix + "qabsmax", qabsmax)
            offset = _checks.check_tensor(prefix + "offset", self.offset, dtypes=(torch.float32,))
            _check_numel(prefix + "offset", offset, 1, "a scalar")
            _checks.check_same_device(
                prefix + "qabsmax", qabsmax, **{prefix + "nested_absmax": nested_absmax, prefix + "offset": offset}
            )
        else:
            absmax = _checks.check_tensor(prefix + "absmax", self.absmax, dtypes=(torch.float32,))
            _check_numel(prefix + "absmax", absmax, nblocks, f"one per block of {self.blocksize}")


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, Nf4QuantState]:
    """NF4-quantize ``weight`` (float32/bfloat16/float16, any shape) like bitsandbytes'
    ``quantize_4bit(weight, blocksize, compress_statistics=double_quant, quant_type="nf4")``.

    Returns ``packed`` uint8 ``[(numel + 1) // 2, 1]`` and its :class:`Nf4QuantState`.
    """
    _checks.check_tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES)
    _check_nonempty("weight", weight)
    _check_blocksize("blocksize", blocksize, BLOCKSIZES_4BIT)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant: expected a bool, got {type(double_quant).__name__}")
    packed, absmax = torch.ops.npu_ft.nf4_quantize(weight.detach(), blocksize)
    if not double_quant:
        return packed, Nf4QuantState(shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, absmax=absmax)
    offset = absmax.mean()
    code = dynamic_code_8bit(weight.device)
    qabsmax, nested_absmax = torch.ops.npu_ft.quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
    state = Nf4QuantState(
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
        qabsmax=qabsmax,
        nested_absmax=nested_absmax,
        nested_code=code.clone(),
        nested_blocksize=NESTED_BLOCKSIZE,
        offset=offset,
    )
    return packed, state


def dequantize_nf4(packed: torch.Tensor, state: Nf4QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize ``packed`` (uint8 ``[(numel+1)//2, 1]`` or any shape with that numel) to a tensor
    of ``state.shape`` in ``dtype`` (default ``state.dtype``)."""
    _checks.check_tensor("packed", packed, dtypes=(torch.uint8,))
    if not isinstance(state, Nf4QuantState):
        raise TypeError(f"state: expected an Nf4QuantState, got {type(state).__name__}")
    state.validate("state.")
    dtype = state.dtype if dtype is None else _check_float_dtype("dtype", dtype)
    n = state.numel
    _check_numel("packed", packed, (n + 1) // 2, f"two 4-bit codes per byte for shape {tuple(state.shape)}")
    _checks.check_same_device("packed", packed, **{"state.absmax": state.stored_absmax})
    absmax = state.absmax_fp32()
    return torch.ops.npu_ft.nf4_dequantize(packed, absmax, state.blocksize, list(state.shape), dtype)
