"""Triton kernels for ``npu_ft::lora_linear`` / ``nf4_linear`` and their backward ops.

The LoRA forward ``y = x @ W.T + b + s * (x_lora @ A.T) @ B.T`` is one GEMM over a K dimension
concatenated from the base and the LoRA parts::

    y = [x | s*h] @ [W | B].T + b,     h = x_lora @ A.T  ([M, r], a skinny torch matmul)

:func:`dual_gemm` computes ``C = A1 @ B1 + scale2 * (A2 @ B2) + bias`` in a single tiled kernel with
two K-loops into one fp32 accumulator, so the ``[M, out]`` output is written once and the LoRA
branch never materializes a full-size intermediate. The backward's ``dx = g @ W + dh @ A`` with
``dh = s * g @ B`` is the same kernel with other operands; ``dA``, ``dB`` (skinny) and ``dbias`` are
torch ops.

Dtypes: each K-loop multiplies operands of one dtype (x/W in x's dtype, h/B in lora_A's dtype, which
PEFT may keep in fp32 over a bf16 base); accumulation is fp32 and the output is cast once. On a GPU,
bf16/fp16 tiles go to the tensor cores as they are, fp32 tiles use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` allows it (as torch's own matmul does). Under the
interpreter every tile is upcast to fp32 right after its load (its bf16 arithmetic is wrong) and
fp32 -> bf16 stores are rounded by hand (it truncates).

Result semantics vs. the reference (which rounds ``x @ W.T + b`` to x's dtype before adding the
branch, as PEFT does): the fused kernel adds the branch in fp32 before the single rounding, so it is
at least as accurate; tests compare with tolerances of a few bf16 ulps.

``nf4_linear`` on CUDA dequantizes W with the Triton NF4 kernel into a temporary of x's dtype, then
runs the same fused GEMM. Why not dequantize inside the GEMM's K-loop: in training M (tokens) is in
the thousands, so the GEMM is compute-bound; a fused kernel would unpack every weight tile once per
M-tile (cdiv(M, BLOCK_M) times over) inside the tensor-core loop, whereas one dequantize pass costs
~2.5 bytes/parameter of memory traffic, small next to 2*M*N*K flops. A fused dequant-GEMM only wins
for GEMV-like M (decoding), which fine-tuning does not do. The temporary lives for one call (the
caching allocator reuses it), so peak memory grows by one layer's weight in x's dtype, as with
bitsandbytes' ``matmul_4bit``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from npu_ft.ops import _registry

from . import nf4 as _nf4
from ._common import interpreting, needs_bf16_rounding, round_to_bf16_rne


@triton.jit
def _dual_gemm_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr,
    M, N, K1, K2, scale2,
    s_a1m, s_a1k, s_b1k, s_b1n,
    s_a2m, s_a2k, s_b2k, s_b2n,
    s_cm, s_cn,
    HAS_BIAS: tl.constexpr,
    HAS_SECOND: tl.constexpr,
    UPCAST: tl.constexpr,
    RNE_BF16: tl.constexpr,
    PRECISION1: tl.constexpr,
    PRECISION2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each column of B tiles while it is in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * grid_n
    group = pid // in_group
    first_m = group * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # K-loop 1: A1 [M, K1] @ B1 [K1, N]
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K1, BLOCK_K):
        kk = (k0 + rk).to(tl.int64)
        k_ok = kk < K1
        a = tl.load(a1_ptr + rm64[:, None] * s_a1m + kk[None, :] * s_a1k,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b1_ptr + kk[:, None] * s_b1k + rn64[None, :] * s_b1n,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION1)

    # K-loop 2: scale2 * A2 [M, K2] @ B2 [K2, N]  (the LoRA rank; usually one iteration)
    if HAS_SECOND:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        rr = tl.arange(0, BLOCK_R)
        for r0 in range(0, K2, BLOCK_R):
            kr = r0 + rr
            r_ok = kr < K2
            a = tl.load(a2_ptr + rm64[:, None] * s_a2m + kr[None, :] * s_a2k,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b2_ptr + kr[:, None] * s_b2k + rn64[None, :] * s_b2n,
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc2 = tl.dot(a, b, acc2, input_precision=PRECISION2)
        acc += acc2 * scale2

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    if RNE_BF16:
        acc = round_to_bf16_rne(acc)
    tl.store(c_ptr + rm64[:, None] * s_cm + rn64[None, :] * s_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: TF32 for fp32 tiles only where torch's matmul would use it too.

    For bf16/fp16 tiles Triton's default ("tf32") is passed; it does not affect 16-bit dots.
    """
    if dtype != torch.float32:
        return "tf32"
    if interpreting() or not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _blocks(M: int, N: int, K2: int, dtype: torch.dtype) -> dict:
    block_r = max(16, min(64, triton.next_power_of_2(max(K2, 1))))
    if interpreting():
        # few, larger programs: the interpreter's cost is per program instance
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_R=block_r, GROUP_M=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_R=block_r, GROUP_M=8,
                    num_warps=4, num_stages=3)
    small = M <= 64
    return dict(BLOCK_M=64 if small else 128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=block_r, GROUP_M=8,
                num_warps=4 if small else 8, num_stages=3)


def dual_gemm(
    a1: torch.Tensor,
    b1: torch.Tensor,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    scale2: float = 1.0,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``a1 @ b1 + scale2 * (a2 @ b2) + bias`` in one Triton kernel, fp32 accumulation.

    Shapes: a1 [M, K1], b1 [K1, N], a2 [M, K2], b2 [K2, N], bias [N]; any strides (pass transposed
    views, e.g. ``weight.t()``, without copying). a1/b1 share a dtype, a2/b2 share a dtype.
    Returns a contiguous [M, N] tensor of ``out_dtype`` (default a1's dtype).
    """
    M, K1 = a1.shape
    K1b, N = b1.shape
    if K1b != K1:
        raise ValueError(f"b1: shape {tuple(b1.shape)} does not match a1's {tuple(a1.shape)}")
    if a1.dtype != b1.dtype:
        raise TypeError(f"b1: dtype {b1.dtype} differs from a1's {a1.dtype}")
    has_second = a2 is not None and b2 is not None
    if a2 is not None and b2 is not None:
        if a2.shape[0] != M or b2.shape[1] != N or a2.shape[1] != b2.shape[0]:
            raise ValueError(f"a2/b2: shapes {tuple(a2.shape)} @ {tuple(b2.shape)} do not give [{M}, {N}]")
        if a2.dtype != b2.dtype:
            raise TypeError(f"b2: dtype {b2.dtype} differs from a2's {a2.dtype}")
        K2 = a2.shape[1]
    else:
        a2, b2, K2 = a1, b1, 0
    out_dtype = out_dtype or a1.dtype
    if bias is not None:
        bias = bias.contiguous()
    out = torch.empty((M, N), dtype=out_dtype, device=a1.device)
    if M == 0 or N == 0:
        return out
    cfg = _blocks(M, N, K2, a1.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _dual_gemm_kernel[grid](
        a1, b1, a2, b2, bias if bias is not None else out, out,
        M, N, K1, K2, float(scale2),
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        HAS_SECOND=has_second and K2 > 0,
        UPCAST=interpreting(),
        RNE_BF16=needs_bf16_rounding(out_dtype),
        PRECISION1=_precision(a1.dtype),
        PRECISION2=_precision(a2.dtype),
        **cfg,
    )
    return out


# ----------------------------------------------------------------------------------------------
# op kernels (exactly the ops' arguments)
# ----------------------------------------------------------------------------------------------


def _lora_h(x2, lora_A, x_lora):
    xl = x2.to(lora_A.dtype) if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])
    return xl @ lora_A.t()


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, x_lora):
    """CUDA ``npu_ft::lora_linear``: returns ``(y [..., out] in x's dtype, h [..., r] in lora_A's)``."""
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    h2 = _lora_h(x2, lora_A, x_lora)
    y2 = dual_gemm(x2, weight.t(), h2, lora_B.t(), scaling, bias, out_dtype=x.dtype)
    return y2.reshape(lead + (weight.shape[0],)), h2.reshape(lead + (lora_A.shape[0],))


def _backward(grad_out, x, weight_fn, lora_A, lora_B, h, scaling, x_lora, output_mask):
    need_dx, need_dx_lora, need_dA, need_dB, need_dbias = output_mask
    in_features = x.shape[-1]
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    dx, dx_lora, dA, dB, dbias = (x.new_empty(0) for _ in range(5))
    dh2: torch.Tensor | None = None  # [M, r], already scaled
    if lora_A is not None:
        gl = g2.to(lora_A.dtype) * scaling
        if need_dB:
            dB = gl.t() @ h.reshape(-1, lora_A.shape[0])
        if need_dA or need_dx_lora or (need_dx and x_lora is None):
            dh2 = gl @ lora_B
    if dh2 is not None:
        if need_dA:
            xl = x.to(lora_A.dtype) if x_lora is None else x_lora
            dA = dh2.t() @ xl.reshape(-1, in_features)
        if need_dx_lora and x_lora is not None:
            dx_lora = dual_gemm(dh2, lora_A).reshape(x_lora.shape)
    if need_dx:
        weight = weight_fn()
        if dh2 is not None and x_lora is None:
            dx2 = dual_gemm(g2, weight, dh2, lora_A, 1.0, out_dtype=x.dtype)
        else:
            dx2 = dual_gemm(g2, weight, out_dtype=x.dtype)
        dx = dx2.reshape(x.shape)
    if need_dbias:
        dbias = g2.sum(0)
    return dx, dx_lora, dA, dB, dbias


def lora_linear_backward(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask):
    """CUDA ``npu_ft::lora_linear_backward``: ``(dx, dx_lora, dA, dB, dbias)``; unrequested = empty."""
    return _backward(grad_out, x, lambda: weight, lora_A, lora_B, h, scaling, x_lora, output_mask)


def _dequantize(packed, absmax, blocksize, weight_shape, dtype):
    return _nf4.nf4_dequantize(packed, absmax, blocksize, [int(s) for s in weight_shape], dtype)


def nf4_linear(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, scaling, x_lora):
    """CUDA ``npu_ft::nf4_linear``: Triton NF4 dequantize to x's dtype, then the fused GEMM."""
    out_features = int(weight_shape[0])
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    weight = _dequantize(packed, absmax, blocksize, weight_shape, x.dtype)
    if lora_A is None:
        y2 = dual_gemm(x2, weight.t(), bias=bias, out_dtype=x.dtype)
        return y2.reshape(lead + (out_features,)), x.new_empty(0)
    h2 = _lora_h(x2, lora_A, x_lora)
    y2 = dual_gemm(x2, weight.t(), h2, lora_B.t(), scaling, bias, out_dtype=x.dtype)
    return y2.reshape(lead + (out_features,)), h2.reshape(lead + (lora_A.shape[0],))


def nf4_linear_backward(grad_out, x, packed, absmax, blocksize, weight_shape, lora_A, lora_B, h, scaling,
                        x_lora, output_mask):
    """CUDA ``npu_ft::nf4_linear_backward``; dequantizes W again, only when dx is needed."""
    return _backward(
        grad_out, x, lambda: _dequantize(packed, absmax, blocksize, weight_shape, x.dtype),
        lora_A, lora_B, h, scaling, x_lora, output_mask,
    )


KERNELS: _registry.KernelTable = {
    "lora_linear": lora_linear,
    "lora_linear_backward": lora_linear_backward,
    "nf4_linear": nf4_linear,
    "nf4_linear_backward": nf4_linear_backward,
}

