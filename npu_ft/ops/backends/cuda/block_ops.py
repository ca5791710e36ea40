"""Triton kernels of the decoder-block ops: ``rms_norm`` (+ residual), ``rope``, ``swiglu`` and
their backward ops.

* rms_norm: one program per row, the row in one block of ``next_power_of_2(H)`` (as Liger-Kernel's
  RMSNorm; Qwen's widest hidden size, 8192, fits). The backward pass handles ``ROWS`` rows per
  program and writes one float32 partial weight gradient per program, summed by torch afterwards.
* rope: a ``[ROWS, D/2]`` tile of (batch, head, position) rows per program, any strides of q/k.
* swiglu: 1-D blocks of ``BLOCK`` elements.

Every load is upcast to float32 at once and every value computed in float32, rounded once when
stored (Triton's interpreter computes bf16 arithmetic wrongly and truncates fp32 -> bf16, so bf16
stores are rounded by hand there, see ``_common``). Intermediate roundings that transformers does
(``x + residual`` and ``normed`` in x's dtype) are reproduced with :func:`_round_to`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from npu_ft.ops import _registry
from npu_ft.ops import rms_norm as _rms_norm

from ._common import interpreting, needs_bf16_rounding, round_to_bf16_rne

__all__ = ["KERNELS"]


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 ``x`` rounded to DTYPE's precision, returned as fp32."""
    if RNE_BF16:
        x = round_to_bf16_rne(x)
    return x.to(DTYPE).to(tl.float32)


# ----------------------------------------------------------------------------------------------
# rms_norm
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, H, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, RNE_X: tl.constexpr, RNE_Y: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
        x = _round_to(x, h_ptr.dtype.element_ty, RNE_X)
        tl.store(h_ptr + row * H + cols, x.to(h_ptr.dtype.element_ty), mask=ok)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = w * _round_to(x * rstd, x_ptr.dtype.element_ty, RNE_X)
    if RNE_Y:
        y = round_to_bf16_rne(y)
    tl.store(y_ptr + row * H + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_backward_kernel(gy_ptr, gh_ptr, h_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, H,
                              HAS_GH: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                              ROWS: tl.constexpr, BLOCK: tl.constexpr, RNE_X: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS):
        row = (pid * ROWS + i).to(tl.int64)
        if row < rows:
            rstd = tl.load(rstd_ptr + row)
            n = tl.load(h_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32) * rstd
            gy = tl.load(gy_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
            if NEED_DW:
                dw += gy * _round_to(n, h_ptr.dtype.element_ty, RNE_X)
            if NEED_DX:
                g = _round_to(gy * w, h_ptr.dtype.element_ty, RNE_X)
                d = rstd * (g - n * (tl.sum(g * n, axis=0) / H))
                if HAS_GH:
                    d += tl.load(gh_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
                if RNE_X:
                    d = round_to_bf16_rne(d)
                tl.store(dx_ptr + row * H + cols, d.to(dx_ptr.dtype.element_ty), mask=ok)
    if NEED_DW:
        tl.store(dw_ptr + pid * H + cols, dw, mask=ok)


def _norm_block(hidden: int) -> int:
    return triton.next_power_of_2(max(hidden, 1))


def rms_norm(x, weight, eps, residual):
    """CUDA ``npu_ft::rms_norm``: ``(y, h, rstd)`` (h empty without a residual)."""
    hidden = x.shape[-1]
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=_rms_norm.output_dtype(x.dtype, weight.dtype), device=x.device)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rows = x.numel() // max(hidden, 1)
    if rows:
        _rms_norm_kernel[(rows,)](
            x, residual.contiguous() if residual is not None else x, weight.contiguous(), y,
            h if residual is not None else x, rstd, hidden, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=_norm_block(hidden),
            RNE_X=needs_bf16_rounding(x.dtype), RNE_Y=needs_bf16_rounding(y.dtype),
        )
    return y, h, rstd


def rms_norm_backward(grad_y, grad_h, h, weight, rstd, output_mask):
    """CUDA ``npu_ft::rms_norm_backward``: ``(dx, dweight)`` (empty where not asked)."""
    need_dx, need_dw = bool(output_mask[0]), bool(output_mask[1])
    hidden = h.shape[-1]
    rows = h.numel() // max(hidden, 1)
    per_program = 1 if interpreting() else 32
    programs = triton.cdiv(rows, per_program)
    dx = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dx else h.new_empty(0)
    partial = torch.empty((programs, hidden), dtype=torch.float32, device=h.device) if need_dw else None
    if rows and (need_dx or need_dw):
        _rms_norm_backward_kernel[(programs,)](
            grad_y.contiguous(), grad_h.contiguous() if grad_h is not None else h, h.contiguous(), weight.contiguous(),
            rstd.contiguous(), dx if need_dx else h, partial if partial is not None else rstd, rows, hidden,
            HAS_GH=grad_h is not None, NEED_DX=need_dx, NEED_DW=need_dw, ROWS=per_program, BLOCK=_norm_block(hidden),
            RNE_X=needs_bf16_rounding(h.dtype),
        )
    if not need_dw:
        return dx, weight.new_empty(0)
    dweight = partial.sum(0) if partial is not None else torch.zeros(hidden, device=h.device)
    return dx, dweight.to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# rope
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, heads, S, HALF,
                 sxb, sxh, sxs, sob, soh, sos, scb,
                 TRANSPOSE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, RNE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
    b = rows // (heads * S)
    hh = (rows // S) % heads
    t = rows % S
    xo = (b * sxb + hh * sxh + t * sxs)[:, None] + cols[None, :]
    oo = (b * sob + hh * soh + t * sos)[:, None] + cols[None, :]
    co = (b * scb + t * (2 * HALF))[:, None] + cols[None, :]
    x1 = tl.load(x_ptr + xo, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + co, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + co + HALF, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + co, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + co + HALF, mask=ok, other=0.0).to(tl.float32)
    if TRANSPOSE:  # backward: g*cos + rot^T(g*sin)
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:  # x*cos + rot(x)*sin
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    if RNE:
        o1 = round_to_bf16_rne(o1)
        o2 = round_to_bf16_rne(o2)
    tl.store(out_ptr + oo, o1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + oo + HALF, o2.to(out_ptr.dtype.element_ty), mask=ok)


def _rope_one(x, cos, sin, transpose: bool):
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.preserve_format)
    batch, heads, seq, dim = x.shape
    n_rows = batch * heads * seq
    if n_rows == 0:
        return out
    half = dim // 2
    block = triton.next_power_of_2(max(half, 1))
    rows_per = max(1, min(64, 4096 // block))
    _rope_kernel[(triton.cdiv(n_rows, rows_per),)](
        x, cos, sin, out, n_rows, heads, seq, half,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        0 if cos.shape[0] == 1 else seq * dim,
        TRANSPOSE=transpose, ROWS=rows_per, BLOCK=block, RNE=needs_bf16_rounding(x.dtype),
    )
    return out


def rope(q, k, cos, sin):
    """CUDA ``npu_ft::rope``."""
    cos, sin = cos.contiguous(), sin.contiguous()
    return _rope_one(q, cos, sin, False), _rope_one(k, cos, sin, False)


def rope_backward(grad_q, grad_k, cos, sin):
    """CUDA ``npu_ft::rope_backward``."""
    cos, sin = cos.contiguous(), sin.contiguous()
    return _rope_one(grad_q, cos, sin, True), _rope_one(grad_k, cos, sin, True)


# ----------------------------------------------------------------------------------------------
# swiglu
# ----------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr, RNE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    if RNE:
        out = round_to_bf16_rne(out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_backward_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, NEED_DG: tl.constexpr, NEED_DU: tl.constexpr,
                            BLOCK: tl.constexpr, RNE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    if NEED_DG:
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dg = dy * u * s * (1.0 + g * (1.0 - s))
        if RNE:
            dg = round_to_bf16_rne(dg)
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=ok)
    if NEED_DU:
        du = dy * (g * s)
        if RNE:
            du = round_to_bf16_rne(du)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=ok)


def _elementwise_block() -> int:
    return 4096 if interpreting() else 1024


def swiglu(gate, up):
    """CUDA ``npu_ft::swiglu``."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = _elementwise_block()
        _swiglu_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, RNE=needs_bf16_rounding(gate.dtype))
    return out


def swiglu_backward(grad, gate, up, output_mask):
    """CUDA ``npu_ft::swiglu_backward``: ``(d gate, d up)`` (empty where not asked)."""
    need_dg, need_du = bool(output_mask[0]), bool(output_mask[1])
    gate, up, grad = gate.contiguous(), up.contiguous(), grad.contiguous()
    dgate = torch.empty_like(gate) if need_dg else gate.new_empty(0)
    dup = torch.empty_like(up) if need_du else up.new_empty(0)
    n = gate.numel()
    if n and (need_dg or need_du):
        block = _elementwise_block()
        _swiglu_backward_kernel[(triton.cdiv(n, block),)](
            grad, gate, up, dgate if need_dg else gate, dup if need_du else up, n, NEED_DG=need_dg, NEED_DU=need_du,
            BLOCK=block, RNE=needs_bf16_rounding(gate.dtype))
    return dgate, dup


KERNELS: _registry.KernelTable = {
    "rms_norm": rms_norm,
    "rms_norm_backward": rms_norm_backward,
    "rope": rope,
    "rope_backward": rope_backward,
    "swiglu": swiglu,
    "swiglu_backward": swiglu_backward,
}


def compile_for_target(build) -> None:
    """Compile every kernel above for a GPU target (``_aot``'s ``build(fn, label, types, constexprs)``)."""
    for dtype in ("fp32", "bf16"):
        ptr = "*" + dtype
        build(_rms_norm_kernel, f"rms_norm {dtype}",
              {"x_ptr": ptr, "res_ptr": ptr, "w_ptr": ptr, "y_ptr": ptr, "h_ptr": ptr, "rstd_ptr": "*fp32",
               "H": "i32", "eps": "fp32"},
              {"HAS_RESIDUAL": True, "BLOCK": 1024, "RNE_X": False, "RNE_Y": False})
        build(_rms_norm_backward_kernel, f"rms_norm_backward {dtype}",
              {"gy_ptr": ptr, "gh_ptr": ptr, "h_ptr": ptr, "w_ptr": ptr, "rstd_ptr": "*fp32", "dx_ptr": ptr,
               "dw_ptr": "*fp32", "rows": "i32", "H": "i32"},
              {"HAS_GH": True, "NEED_DX": True, "NEED_DW": True, "ROWS": 32, "BLOCK": 1024, "RNE_X": False})
        build(_rope_kernel, f"rope {dtype}",
              {"x_ptr": ptr, "cos_ptr": ptr, "sin_ptr": ptr, "out_ptr": ptr, **dict.fromkeys(
                  ("n_rows", "heads", "S", "HALF", "sxb", "sxh", "sxs", "sob", "soh", "sos", "scb"), "i32")},
              {"TRANSPOSE": False, "ROWS": 64, "BLOCK": 64, "RNE": False})
        build(_swiglu_kernel, f"swiglu {dtype}", {"g_ptr": ptr, "u_ptr": ptr, "out_ptr": ptr, "n": "i32"},
              {"BLOCK": 1024, "RNE": False})
        build(_swiglu_backward_kernel, f"swiglu_backward {dtype}",
              {"dy_ptr": ptr, "g_ptr": ptr, "u_ptr": ptr, "dg_ptr": ptr, "du_ptr": ptr, "n": "i32"},
              {"NEED_DG": True, "NEED_DU": True, "BLOCK": 1024, "RNE": False})
