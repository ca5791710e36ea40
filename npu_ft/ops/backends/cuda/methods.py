"""Triton kernels of the LoRA-family ops (``dora_*``, ``lora_fa_*``) on CUDA.

The GEMMs are the fused dual GEMM of :mod:`npu_ft.ops.backends.cuda.lora` (``x @ W.T + s*h @ B.T``
in one pass, fp32 accumulation) and cuBLAS for the skinny ``[*, r]`` products; the DoRA-specific
work is three small Triton kernels:

* :func:`dora_row_norm` - ``norm_i = sqrt(||W_i||^2 + sum_k B_ik (2s (W A^T)_ik + s^2 (B A A^T)_ik))``
  over ``[out, r]`` rows: the weight norm without the ``[out, in]`` matrix ``W + s*B@A``.
* :func:`dora_scale` - the forward epilogue ``y = g * z + bias`` (one read of z, one write of y).
* :func:`dora_grad` - the backward prologue: ``dz = g * dy`` and per-tile column sums of ``dy * z``
  (summed by torch: deterministic), from which ``dmagnitude = sum(dy * z) / norm``.

All three compute in fp32 and round once; under ``TRITON_INTERPRET=1`` (CI) loads are upcast at once
and bf16 stores rounded by hand, as in the other kernel modules. LoRA-FA needs no kernel of its own:
its forward is the LoRA forward, its backward the dual GEMM ``dy @ W + dh @ A`` and two cuBLAS GEMMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from npu_ft.ops import _registry
from npu_ft.ops.dora import returns_z

from . import lora as _lora
from ._common import interpreting, needs_bf16_rounding, round_to_bf16_rne


@triton.jit
def _dora_row_norm_kernel(wa_ptr, bg_ptr, b_ptr, wsq_ptr, out_ptr, OUT, R, two_s, s_sq,
                          BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < OUT
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        cols = r0 + tl.arange(0, BLOCK_R)
        ok = row_ok[:, None] & (cols < R)[None, :]
        offs = rows64[:, None] * R + cols[None, :]
        wa = tl.load(wa_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        bg = tl.load(bg_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(b * (two_s * wa + s_sq * bg), axis=1)
    wsq = tl.load(wsq_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, tl.sqrt(tl.maximum(wsq + acc, 0.0)), mask=row_ok)


@triton.jit
def _dora_scale_kernel(z_ptr, g_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr, RNE_BF16: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = z * g[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if RNE_BF16:
        y = round_to_bf16_rne(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dora_grad_kernel(gy_ptr, z_ptr, g_ptr, gz_ptr, part_ptr, M, N, RNE_BF16: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    ok = (rm < M)[:, None] & n_ok[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    gy = tl.load(gy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    gz = gy * g[None, :]
    if RNE_BF16:
        gz = round_to_bf16_rne(gz)
    tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=ok)
    tl.store(part_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(gy * z, axis=0), mask=n_ok)


def _tiles(M: int, N: int) -> tuple[int, int]:
    if interpreting():
        return 32, 64
    return 64, 128


def dora_row_norm(wa: torch.Tensor, bg: torch.Tensor, b: torch.Tensor, wsq: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """fp32 ``[out]`` norms from ``wa = W @ A.T``, ``bg = B @ A @ A.T``, ``b = B`` (``[out, r]``) and ``wsq``."""
    out_features, r = b.shape
    out = torch.empty(out_features, dtype=torch.float32, device=b.device)
    if out_features == 0:
        return out
    block_r = max(16, min(64, triton.next_power_of_2(max(r, 1))))
    block_o = 32 if interpreting() else 64
    _dora_row_norm_kernel[(triton.cdiv(out_features, block_o),)](
        wa.contiguous(), bg.contiguous(), b.contiguous(), wsq.float().contiguous(), out, out_features, r,
        2.0 * scaling, scaling * scaling, BLOCK_O=block_o, BLOCK_R=block_r)
    return out


def dora_scale(z: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``y = g * z + bias`` for z ``[M, N]`` (contiguous), g fp32 ``[N]``; y in ``out_dtype``."""
    M, N = z.shape
    y = torch.empty((M, N), dtype=out_dtype, device=z.device)
    if M == 0 or N == 0:
        return y
    bm, bn = _tiles(M, N)
    _dora_scale_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        z, g, bias if bias is not None else g, y, M, N, HAS_BIAS=bias is not None,
        RNE_BF16=needs_bf16_rounding(out_dtype), BLOCK_M=bm, BLOCK_N=bn)
    return y


def dora_grad(gy: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dz = g * dy in dy's dtype, sum over rows of dy * z in fp32 [N])`` for dy, z ``[M, N]``."""
    M, N = gy.shape
    gz = torch.empty_like(gy, memory_format=torch.contiguous_format)
    bm, bn = _tiles(M, N)
    grid_m = triton.cdiv(M, bm) if M else 0
    part = torch.zeros((max(grid_m, 1), N), dtype=torch.float32, device=gy.device)
    if M and N:
        _dora_grad_kernel[(grid_m, triton.cdiv(N, bn))](
            gy, z.contiguous(), g, gz, part, M, N, RNE_BF16=needs_bf16_rounding(gy.dtype), BLOCK_M=bm, BLOCK_N=bn)
    return gz, part.sum(0)


# ----------------------------------------------------------------------------------------------
# op kernels
# ----------------------------------------------------------------------------------------------


def dora_weight_norm(weight, weight_sq_norm, lora_A, lora_B, scaling):
    """CUDA ``npu_ft::dora_weight_norm``: cuBLAS ``W @ A.T`` and ``B @ A @ A.T``, then :func:`dora_row_norm`."""
    wa = torch.mm(weight, lora_A.to(weight.dtype).t()).float()
    a, b = lora_A.float(), lora_B.float()
    return dora_row_norm(wa, torch.mm(b, torch.mm(a, a.t())), b, weight_sq_norm, scaling)


def _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora):
    out_features, in_features = weight.shape
    lead = tuple(x.shape[:-1])
    norm = dora_weight_norm(weight, weight_sq_norm, lora_A, lora_B, scaling)
    g = (magnitude.float() / norm).contiguous()
    x2 = x.reshape(-1, in_features)
    xd2 = x2 if x_lora is None else x_lora.reshape(-1, in_features).to(x.dtype)
    h2 = _lora._lora_h(x2, lora_A, x_lora)
    z2 = _lora.dual_gemm(xd2, weight.t(), h2, lora_B.t(), scaling, out_dtype=x.dtype)
    y2 = dora_scale(z2, g, bias, torch.float32 if x_lora is not None else x.dtype)
    if x_lora is not None:  # + x @ W.T - x_d @ W.T: the magnitude applies to the dropped input only
        y2 = y2.add_(_lora.dual_gemm(x2, weight.t(), out_dtype=torch.float32)).sub_(
            _lora.dual_gemm(xd2, weight.t(), out_dtype=torch.float32)).to(x.dtype)
    z_out = z2.reshape(lead + (out_features,)) if returns_z(bias, x_lora) else x.new_empty(0)
    return y2.reshape(lead + (out_features,)), h2.reshape(lead + (lora_A.shape[0],)), z_out, norm


def _dora_backward(grad_out, x, weight_fn, in_features, lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora,
                   has_x_lora, z_is_y, output_mask):
    need_dx, need_dx_lora, need_dA, need_dB, need_dmag, need_dbias = output_mask
    out_features = grad_out.shape[-1]
    lead = tuple(grad_out.shape[:-1])
    g2 = grad_out.reshape(-1, out_features)
    g = (magnitude.float() / norm).contiguous()
    gz, col = dora_grad(g2, z.reshape(-1, out_features), g)
    outs = [grad_out.new_empty(0) for _ in range(6)]
    gl = gz.to(lora_A.dtype) * scaling
    dh2 = gl @ lora_B
    if need_dB:
        outs[3] = gl.t() @ h.reshape(-1, lora_A.shape[0])
    if need_dA:
        xl = (x_lora if x_lora is not None else x).reshape(-1, in_features).to(lora_A.dtype)
        outs[2] = dh2.t() @ xl
    if need_dmag:  # z = y / g when y was saved: sum(dy * y) / magnitude
        outs[4] = (col / (magnitude.float() if z_is_y else norm)).to(magnitude.dtype)
    if need_dbias:
        outs[5] = g2.sum(0)
    if need_dx or need_dx_lora:
        weight = weight_fn()
        if not has_x_lora:
            outs[0] = _lora.dual_gemm(gz, weight, dh2, lora_A, 1.0, out_dtype=grad_out.dtype).reshape(
                lead + (in_features,))
        else:  # dx = dy @ W; dx_lora = ((g - 1) * dy) @ W + dh @ A
            if need_dx:
                outs[0] = _lora.dual_gemm(g2, weight, out_dtype=grad_out.dtype).reshape(lead + (in_features,))
            if need_dx_lora:
                gd = (g2.float() * (g - 1.0)).to(g2.dtype)
                outs[1] = _lora.dual_gemm(gd, weight, dh2, lora_A, 1.0, out_dtype=lora_A.dtype).reshape(
                    lead + (in_features,))
    return tuple(outs)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora):
    """CUDA ``npu_ft::dora_linear``: ``(y, h, z, norm)``."""
    return _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora)


def dora_linear_backward(grad_out, x, weight, lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora, has_x_lora,
                         z_is_y, output_mask):
    """CUDA ``npu_ft::dora_linear_backward``: ``(dx, dx_lora, dA, dB, dmagnitude, dbias)``."""
    return _dora_backward(grad_out, x, lambda: weight, weight.shape[1], lora_A, lora_B, magnitude, h, z, norm,
                          scaling, x_lora, has_x_lora, z_is_y, output_mask)


def dora_nf4_linear(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, magnitude, weight_sq_norm,
                    scaling, x_lora):
    """CUDA ``npu_ft::dora_nf4_linear``: Triton NF4 dequantize to x's dtype, then the dense kernel."""
    weight = _lora._dequantize(packed, absmax, blocksize, weight_shape, x.dtype)
    return _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, x_lora)


def dora_nf4_linear_backward(grad_out, x, packed, absmax, blocksize, weight_shape, lora_A, lora_B, magnitude, h, z,
                             norm, scaling, x_lora, has_x_lora, z_is_y, output_mask):
    """CUDA ``npu_ft::dora_nf4_linear_backward``; dequantizes W again, only when dx is needed."""
    def weight():
        return _lora._dequantize(packed, absmax, blocksize, weight_shape, grad_out.dtype)

    return _dora_backward(grad_out, x, weight,
                          int(weight_shape[1]), lora_A, lora_B, magnitude, h, z, norm, scaling, x_lora, has_x_lora,
                          z_is_y, output_mask)


def _lora_fa_backward(grad_out, weight_fn, in_features, lora_A, lora_B, h, scaling, has_x_lora, output_mask):
    need_dx, need_dx_lora, need_dB, need_dbias = output_mask
    lead = tuple(grad_out.shape[:-1])
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    gl = g2.to(lora_A.dtype) * scaling
    outs = [grad_out.new_empty(0) for _ in range(4)]
    dh2 = gl @ lora_B
    if need_dB:
        outs[2] = gl.t() @ h.reshape(-1, lora_A.shape[0])
    if need_dx:
        weight = weight_fn()
        dx2 = (_lora.dual_gemm(g2, weight, out_dtype=grad_out.dtype) if has_x_lora
               else _lora.dual_gemm(g2, weight, dh2, lora_A, 1.0, out_dtype=grad_out.dtype))
        outs[0] = dx2.reshape(lead + (in_features,))
    if need_dx_lora and has_x_lora:
        outs[1] = _lora.dual_gemm(dh2, lora_A).reshape(lead + (in_features,))
    if need_dbias:
        outs[3] = g2.sum(0)
    return tuple(outs)


def lora_fa_linear_backward(grad_out, weight, lora_A, lora_B, h, scaling, has_x_lora, output_mask):
    """CUDA ``npu_ft::lora_fa_linear_backward``: ``(dx, dx_lora, dB, dbias)`` from h, never x."""
    return _lora_fa_backward(grad_out, lambda: weight, weight.shape[1], lora_A, lora_B, h, scaling, has_x_lora,
                             output_mask)


def lora_fa_nf4_linear_backward(grad_out, packed, absmax, blocksize, weight_shape, lora_A, lora_B, h, scaling,
                                has_x_lora, output_mask):
    """CUDA ``npu_ft::lora_fa_nf4_linear_backward``; dequantizes W only when dx is needed."""
    def weight():
        return _lora._dequantize(packed, absmax, blocksize, weight_shape, grad_out.dtype)

    return _lora_fa_backward(grad_out, weight,
                             int(weight_shape[1]), lora_A, lora_B, h, scaling, has_x_lora, output_mask)


KERNELS: _registry.KernelTable = {
    "dora_weight_norm": dora_weight_norm,
    "dora_linear": dora_linear,
    "dora_linear_backward": dora_linear_backward,
    "dora_nf4_linear": dora_nf4_linear,
    "dora_nf4_linear_backward": dora_nf4_linear_backward,
    "lora_fa_linear": _lora.lora_linear,  # the forward is LoRA's; only backward's saved tensors differ
    "lora_fa_linear_backward": lora_fa_linear_backward,
    "lora_fa_nf4_linear": _lora.nf4_linear,
    "lora_fa_nf4_linear_backward": lora_fa_nf4_linear_backward,
}


def compile_for_target(build) -> None:
    """Compile the three DoRA kernels for a GPU target (``_aot``'s ``build(fn, label, types, constexprs)``)."""
    fp32, bf16 = "*fp32", "*bf16"
    build(_dora_row_norm_kernel, "dora_row_norm",
          {"wa_ptr": fp32, "bg_ptr": fp32, "b_ptr": fp32, "wsq_ptr": fp32, "out_ptr": fp32, "OUT": "i32", "R": "i32",
           "two_s": "fp32", "s_sq": "fp32"}, {"BLOCK_O": 64, "BLOCK_R": 16})
    build(_dora_scale_kernel, "dora_scale bf16",
          {"z_ptr": bf16, "g_ptr": fp32, "bias_ptr": bf16, "y_ptr": bf16, "M": "i32", "N": "i32"},
          {"HAS_BIAS": True, "RNE_BF16": False, "BLOCK_M": 64, "BLOCK_N": 128})
    build(_dora_grad_kernel, "dora_grad bf16",
          {"gy_ptr": bf16, "z_ptr": bf16, "g_ptr": fp32, "gz_ptr": bf16, "part_ptr": fp32, "M": "i32", "N": "i32"},
          {"RNE_BF16": False, "BLOCK_M": 64, "BLOCK_N": 128})
