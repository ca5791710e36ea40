"""Triton kernel of ``adamw8bit_update``: the whole 8-bit AdamW step of one parameter in one pass.

Each program owns ``ROWS`` blocks of 256 elements: it reads the uint8 moments and their absmax,
dequantizes them through the code maps, updates ``m``, ``v`` and the parameter in float32, computes
the blocks' new absmax and requantizes through bitsandbytes' 65536-entry lookup tables (one per
code map, built once per map and cached). Global memory traffic per element: 2 bytes of state
read + written, the gradient and the parameter; no float32 copy of a moment ever reaches memory.

Arithmetic: the float operations of the reference (:mod:`npu_ft.ops.adamw8bit`) as torch's CPU
kernels evaluate them: ``m * beta1`` then a fused multiply-add with ``(1 - beta1) * g`` (torch's
``add_(alpha=)``), ``fma((1 - beta2) * g, g, v * beta2)`` (``addcmul_``), ``p + (step_size * m) /
denom`` (``addcdiv_``), correctly rounded division and square root, and no other FMA contraction
(the launch disables it). Where the GPU still rounds differently, a moment on a code boundary lands
on the neighbouring code; the tests bound that at one code. Runs on CPU tensors under
``TRITON_INTERPRET=1``, which is how CI tests it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from npu_ft.ops import _registry

from ...adamw8bit import ADAMW8BIT_UPDATE, STATE_BLOCKSIZE
from ._common import needs_bf16_rounding, round_to_bf16_rne
from .nf4 import lut_8bit, store_blockwise_8bit

#: blocks of 256 elements per program
ROWS = 4

# code map -> its lookup table, keyed by the map's identity and version; the map itself is kept
# alive in the value so its address cannot be reused by another tensor while cached
_LUTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _lut(code: torch.Tensor) -> torch.Tensor:
    key = (code.device, code.data_ptr(), code._version)
    hit = _LUTS.get(key)
    if hit is None:
        if len(_LUTS) >= 16:
            _LUTS.clear()
        hit = _LUTS[key] = (code, lut_8bit(code).contiguous())
    return hit[1]


@triton.jit
def _adamw8bit_kernel(
    p_ptr, g_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, code1_ptr, code2_ptr, lut1_ptr, lut2_ptr,
    n, n_blocks,
    beta1, alpha1, beta2, alpha2, correction2, eps, decay, step_size,
    APPLY_DECAY: tl.constexpr, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, RNE_BF16: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCKSIZE)
    row_ok = rows < n_blocks
    offs = rows[:, None] * BLOCKSIZE + cols[None, :]
    ok = row_ok[:, None] & (offs < n)

    q1 = tl.load(s1_ptr + offs, mask=ok, other=0).to(tl.int32)
    q2 = tl.load(s2_ptr + offs, mask=ok, other=0).to(tl.int32)
    a1 = tl.load(a1_ptr + rows, mask=row_ok, other=0.0)
    a2 = tl.load(a2_ptr + rows, mask=row_ok, other=0.0)
    m = tl.load(code1_ptr + q1, mask=ok, other=0.0) * a1[:, None]
    v = tl.load(code2_ptr + q2, mask=ok, other=0.0) * a2[:, None]
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)

    m = tl.fma(g, alpha1, m * beta1)
    v = tl.fma(alpha2 * g, g, v * beta2)
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), correction2) + eps
    if APPLY_DECAY:
        p = p * decay
    p = p + tl.math.div_rn(step_size * m, denom)
    if RNE_BF16:
        p = round_to_bf16_rne(p)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=ok)

    store_blockwise_8bit(m, row_ok, ok, rows, offs, a1_ptr, lut1_ptr, s1_ptr)
    store_blockwise_8bit(v, row_ok, ok, rows, offs, a2_ptr, lut2_ptr, s2_ptr)


def _f32(x: float) -> float:
    """``x`` rounded to float32, as torch rounds a Python scalar for a float32 kernel."""
    return float(torch.tensor(x, dtype=torch.float32))


def adamw8bit_update(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps,
                     weight_decay, step) -> None:
    """The ``adamw8bit_update`` op on CUDA tensors (or CPU tensors under the interpreter); in place."""
    n = p.numel()
    if n == 0:
        return
    for name, t in (("p", p), ("state1", state1), ("state2", state2), ("absmax1", absmax1), ("absmax2", absmax2)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (it is updated in place)")
    n_blocks = -(-n // STATE_BLOCKSIZE)
    code1 = qmap1.to(torch.float32).contiguous()
    code2 = qmap2.to(torch.float32).contiguous()
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    grid = (triton.cdiv(n_blocks, ROWS),)
    _adamw8bit_kernel[grid](
        p, g.contiguous(), state1, state2, absmax1, absmax2, code1, code2, _lut(qmap1), _lut(qmap2),
        n, n_blocks,
        _f32(beta1), _f32(1.0 - beta1), _f32(beta2), _f32(1.0 - beta2), _f32(correction2), _f32(eps),
        _f32(1.0 - lr * weight_decay), _f32(-lr / correction1),
        APPLY_DECAY=weight_decay > 0.0, BLOCKSIZE=STATE_BLOCKSIZE, ROWS=ROWS,
        RNE_BF16=needs_bf16_rounding(p.dtype), enable_fp_fusion=False,
    )


KERNELS: _registry.KernelTable = {ADAMW8BIT_UPDATE: adamw8bit_update}

