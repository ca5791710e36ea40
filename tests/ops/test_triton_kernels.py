"""The CUDA backend's Triton kernels against the references.

Without a GPU these run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py before triton is
imported) on CPU tensors, calling the launchers directly (the CUDA dispatch key is never reached
here). With a GPU the same tests run on it, and the ``cuda``-marked ones also check the dispatch.

Tolerances:
* NF4 quantize / dequantize: bytes and values *exactly* equal to bitsandbytes' (CPU reference).
* 8-bit blockwise: codes, absmax and dequantized values exactly equal to
  ``npu_ft.ops.nf4.*_reference`` and to bitsandbytes' CPU kernel (its 65536-entry lookup table).
* GEMMs: fp32 rtol=1e-5/atol=1e-5; bf16 (and bf16 base + fp32 LoRA) rtol=atol=2e-2 on O(1) outputs:
  the fused kernel adds the LoRA branch before rounding once, the reference rounds twice.

Shapes are tiny and awkward (odd, not divisible by any block) so the file stays well under 90 s in
the interpreter on 2 cores.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from npu_ft.ops.backends.cuda import lora as K  # noqa: E402
from npu_ft.ops.backends.cuda import nf4 as Q  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------------------------
# NF4
# ------------------------------------------------------------------------------------------------


def test_nf4_code_matches_bitsandbytes():
    F = _bnb()
    assert torch.equal(torch.tensor(Q.NF4_CODE_VALUES), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize", [((1,), 64), ((3, 67), 64), ((5, 51), 32), ((2, 129), 128)])
def test_nf4_quantize_and_dequantize_byte_identical_to_bnb(shape, blocksize, dtype):
    F = _bnb()
    A = _rand(shape, dtype, seed=sum(shape) + blocksize)
    if A.numel() > blocksize:
        A.view(-1)[:blocksize] = 0  # an all-zero block (absmax 0)
    packed, absmax = Q.nf4_quantize(A, blocksize)
    ref_packed, state = F.quantize_4bit(A.cpu(), blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert packed.shape == ((A.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(packed.cpu(), ref_packed.view(torch.uint8))
    assert torch.equal(absmax.cpu(), state.absmax)
    from npu_ft.ops import nf4 as N

    own_packed, own_absmax = N.nf4_quantize_reference(A.cpu(), blocksize)
    assert torch.equal(packed.cpu(), own_packed) and torch.equal(absmax.cpu(), own_absmax)

    out = Q.nf4_dequantize(packed, absmax, blocksize, list(shape), dtype)
    ref = F.dequantize_4bit(ref_packed, state)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out.cpu(), ref.reshape(shape))


def test_nf4_quantize_midpoints_go_to_the_lower_code():
    """bnb's tie rule: a value exactly on a midpoint takes the lower code (bucketize right=False)."""
    F = _bnb()
    code = torch.tensor(Q.NF4_CODE_VALUES)
    bounds = (code[:-1] + code[1:]) / 2
    block = torch.cat([torch.tensor([1.0]), bounds, -bounds, torch.zeros(64 - 31)])
    A = torch.cat([block, block * 0.5]).to(DEVICE)  # second block: absmax 0.5 -> x * (1/0.5) exact
    packed, absmax = Q.nf4_quantize(A, 64)
    ref_packed, state = F.quantize_4bit(A.cpu(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(absmax.cpu(), state.absmax)


def test_nf4_all_zero_partial_tail_block_like_bnb():
    """bnb stores the tail block's absmax clamped to 1e-38 (full blocks keep 0)."""
    F = _bnb()
    A = torch.zeros(64 + 5, device=DEVICE)
    packed, absmax = Q.nf4_quantize(A, 64)
    ref_packed, state = F.quantize_4bit(A.cpu(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), state.absmax)
    assert absmax[0] == 0 and absmax[1] > 0


def test_nf4_dequantize_reuses_a_workspace():
    A = _rand((5, 13), torch.float32, seed=3)
    packed, absmax = Q.nf4_quantize(A, 64)
    ws = torch.empty((5, 13), dtype=torch.bfloat16, device=DEVICE)
    out = Q.nf4_dequantize(packed, absmax, 64, [5, 13], torch.bfloat16, out=ws)
    assert out.data_ptr() == ws.data_ptr()
    assert torch.equal(out, Q.nf4_dequantize(packed, absmax, 64, [5, 13], torch.bfloat16))


def test_nf4_rejects_odd_blocksize():
    with pytest.raises(ValueError, match="blocksize"):
        Q.nf4_quantize(torch.zeros(8, device=DEVICE), 7)


# ------------------------------------------------------------------------------------------------
# 8-bit blockwise (double quantization)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel,blocksize", [(1, 256), (300, 256), (129, 64), (70, 33)])
def test_blockwise_8bit_against_references(numel, blocksize, dtype):
    from npu_ft.ops import nf4 as N

    F = _bnb()
    code = F.create_dynamic_map(signed=True)
    A = _rand((numel,), dtype, seed=numel + blocksize, scale=3.0)
    if numel > 2 * blocksize:
        A[blocksize:2 * blocksize] = 0  # an all-zero block stores code 0
    q, absmax = Q.quantize_blockwise_8bit(A, code.to(DEVICE), blocksize)
    ref_q, ref_absmax = N.quantize_blockwise_8bit_reference(A.cpu(), code, blocksize)
    assert q.dtype == torch.uint8 and q.shape == A.shape
    assert torch.equal(q.cpu(), ref_q)
    assert torch.equal(absmax.cpu(), ref_absmax)
    out = Q.dequantize_blockwise_8bit(q, absmax, code.to(DEVICE), blocksize, dtype)
    assert out.dtype == dtype and out.shape == A.shape
    assert torch.equal(out.cpu(), N.dequantize_blockwise_8bit_reference(ref_q, ref_absmax, code, blocksize, dtype))
    if blocksize in (64, 256):  # block sizes bitsandbytes accepts
        bnb_q, bnb_state = F.quantize_blockwise(A.cpu(), code=code, blocksize=blocksize)
        assert torch.equal(q.cpu(), bnb_q)
        assert torch.equal(absmax.cpu(), bnb_state.absmax)
        assert torch.equal(out.cpu(), F.dequantize_blockwise(bnb_q, bnb_state))


def test_double_quantized_absmax_like_bnb():
    """bnb's compress_statistics=True state: our 8-bit dequantize rebuilds its absmax exactly."""
    F = _bnb()
    A = _rand((9, 64), torch.float32, seed=11)
    packed, state = F.quantize_4bit(A.cpu(), blocksize=64, quant_type="nf4", compress_statistics=True)
    s2 = state.state2
    ours = Q.dequantize_blockwise_8bit(state.absmax.to(DEVICE), s2.absmax.to(DEVICE), s2.code.to(DEVICE),
                                       s2.blocksize, torch.float32)
    theirs = F.dequantize_blockwise(state.absmax, s2)
    assert torch.equal(ours.cpu(), theirs)
    W = Q.nf4_dequantize(packed.to(DEVICE), ours + state.offset.to(DEVICE), 64, [9, 64], torch.float32)
    assert torch.equal(W.cpu(), F.dequantize_4bit(packed, state))


# ------------------------------------------------------------------------------------------------
# fused GEMMs
# ------------------------------------------------------------------------------------------------

GEMM_DTYPES = [  # (x/W dtype, LoRA dtype, rtol/atol)
    (torch.float32, torch.float32, 1e-5),
    (torch.bfloat16, torch.bfloat16, 2e-2),
    (torch.bfloat16, torch.float32, 2e-2),
]


def _close(actual, expected, tol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def test_dual_gemm_strided_operands_and_multi_tile_rank():
    a1 = _rand((41, 50), torch.float32, seed=1)[:, ::2]  # [41, 25], non-contiguous
    b1 = _rand((33, 25), torch.float32, seed=2).t()  # [25, 33], transposed view
    a2 = _rand((41, 70), torch.float32, seed=3)  # rank 70 > BLOCK_R: two K2 iterations
    b2 = _rand((70, 33), torch.float32, seed=4)
    bias = _rand((33,), torch.float32, seed=5)
    out = K.dual_gemm(a1, b1, a2, b2, 0.25, bias)
    _close(out, a1 @ b1 + 0.25 * (a2 @ b2) + bias, 1e-4)
    _close(K.dual_gemm(a1, b1), a1 @ b1, 1e-5)


def _lora_inputs(lead, n_in, n_out, r, dtype, ldtype, seed, dropout):
    x = _rand(lead + (n_in,), dtype, seed)
    weight = _rand((n_out, n_in), dtype, seed + 1, scale=n_in ** -0.5)
    bias = _rand((n_out,), dtype, seed + 2)
    A = _rand((r, n_in), ldtype, seed + 3, scale=n_in ** -0.5)
    B = _rand((n_out, r), ldtype, seed + 4, scale=r ** -0.5)
    x_lora = None
    if dropout:
        g = torch.Generator().manual_seed(seed + 5)
        keep = (torch.rand(x.shape, generator=g) > 0.25).to(DEVICE)
        x_lora = x.to(ldtype) * keep / 0.75
    return x, weight, bias, A, B, x_lora


@pytest.mark.parametrize("dtype,ldtype,tol", GEMM_DTYPES)
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_linear_forward_backward(dtype, ldtype, tol, dropout):
    from npu_ft.ops import lora as L

    x, weight, bias, A, B, x_lora = _lora_inputs((3, 7), 37, 29, 5, dtype, ldtype, seed=7, dropout=dropout)
    s = 1.75
    for b in (bias, None):
        y, h = K.lora_linear(x, weight, b, A, B, s, x_lora)
        y_ref, h_ref = L.lora_linear_reference(x, weight, b, A, B, s, x_lora)
        _close(y, y_ref, tol)
        _close(h, h_ref, 1e-5)

    g = _rand(y.shape, dtype, seed=8)
    mask = [True, dropout, True, True, True]
    got = K.lora_linear_backward(g, x, weight, A, B, h, s, x_lora, mask)
    ref = L.lora_linear_backward_reference(g, x, weight, A, B, h_ref, s, x_lora, mask)
    for name, a, e in zip(("dx", "dx_lora", "dA", "dB", "dbias"), got, ref, strict=False):
        assert a.shape == e.shape, name
        if a.numel():
            _close(a, e, tol)

    # outputs not asked for are distinct empty tensors
    dx, dx_lora, dA, dB, dbias = K.lora_linear_backward(g, x, weight, A, B, h, s, x_lora,
                                                        [False, False, False, True, False])
    assert dx.numel() == dx_lora.numel() == dA.numel() == dbias.numel() == 0 and dB.shape == B.shape


def test_lora_linear_unbatched_and_empty_inputs():
    from npu_ft.ops import lora as L

    x, weight, bias, A, B, _ = _lora_inputs((), 19, 11, 3, torch.float32, torch.float32, seed=9, dropout=False)
    y, h = K.lora_linear(x, weight, bias, A, B, 0.5, None)
    _close(y, L.lora_linear_reference(x, weight, bias, A, B, 0.5, None)[0], 1e-5)
    y0, h0 = K.lora_linear(x[None][:0], weight, bias, A, B, 0.5, None)
    assert y0.shape == (0, 11) and h0.shape == (0, 3)


def _nf4_weight(n_out, n_in, blocksize, seed):
    W = _rand((n_out, n_in), torch.float32, seed, scale=n_in ** -0.5)
    return Q.nf4_quantize(W, blocksize)


def _nf4_linear_reference(x, packed, absmax, blocksize, shape, bias, A, B, s, x_lora):
    from npu_ft.ops import lora as L

    if hasattr(torch.ops.npu_ft, "nf4_dequantize"):
        return L.nf4_linear_reference(x, packed, absmax, blocksize, shape, bias, A, B, s, x_lora)
    W = _bnb_dequantize(packed, absmax, blocksize, shape, x.dtype)
    y = torch.nn.functional.linear(x, W, bias)
    if A is None:
        return y, x.new_empty(0)
    xl = x.to(A.dtype) if x_lora is None else x_lora
    h = xl @ A.t()
    return y + ((h @ B.t()) * s).to(y.dtype), h


def _bnb_dequantize(packed, absmax, blocksize, shape, dtype):
    F = _bnb()
    state = F.QuantState(absmax=absmax.cpu(), shape=torch.Size(shape), code=F.get_4bit_type("nf4", device="cpu"),
                         blocksize=blocksize, quant_type="nf4", dtype=dtype)
    return F.dequantize_4bit(packed.cpu(), state).reshape(shape).to(DEVICE)


@pytest.mark.parametrize("dtype,ldtype,tol", GEMM_DTYPES)
@pytest.mark.parametrize("with_lora", [True, False])
def test_nf4_linear_forward_backward(dtype, ldtype, tol, with_lora):
    n_in, n_out, blocksize = 33, 23, 64  # numel 759: last block partial, odd byte count
    packed, absmax = _nf4_weight(n_out, n_in, blocksize, seed=21)
    x, _, bias, A, B, x_lora = _lora_inputs((2, 5), n_in, n_out, 4, dtype, ldtype, seed=22, dropout=with_lora)
    if not with_lora:
        A = B = x_lora = None
    shape = [n_out, n_in]
    y, h = K.nf4_linear(x, packed, absmax, blocksize, shape, bias, A, B, 0.5, x_lora)
    y_ref, h_ref = _nf4_linear_reference(x, packed, absmax, blocksize, shape, bias, A, B, 0.5, x_lora)
    _close(y, y_ref, tol)
    assert h.shape == h_ref.shape

    from npu_ft.ops import lora as L

    g = _rand(y.shape, dtype, seed=23)
    mask = [True, with_lora, with_lora, with_lora, True]
    got = K.nf4_linear_backward(g, x, packed, absmax, blocksize, shape, A, B, h, 0.5, x_lora, mask)
    W = _bnb_dequantize(packed, absmax, blocksize, shape, dtype)
    ref = L.lora_linear_backward_reference(g, x, W, A, B, h_ref, 0.5, x_lora, mask) if with_lora else (
        (g.reshape(-1, n_out) @ W).reshape(x.shape), None, None, None, g.reshape(-1, n_out).sum(0))
    for name, a, e in zip(("dx", "dx_lora", "dA", "dB", "dbias"), got, ref, strict=False):
        if e is not None and a.numel():
            assert a.shape == e.shape, name
            _close(a, e, tol)


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [Q, K], ids=["nf4", "lora"])
def test_kernels_take_exactly_the_op_arguments(module):
    import inspect

    import npu_ft.ops  # noqa: F401  (defines the ops)

    for name, fn in module.KERNELS.items():
        assert hasattr(torch.ops.npu_ft, name), f"op npu_ft::{name} is not defined"
        schema = getattr(torch.ops.npu_ft, name).default._schema
        expected = [arg.name for arg in schema.arguments]
        assert list(inspect.signature(fn).parameters)[: len(expected)] == expected, name
        extra = list(inspect.signature(fn).parameters.values())[len(expected):]
        assert all(p.default is not inspect.Parameter.empty for p in extra), name


def test_register_puts_every_kernel_on_the_cuda_key():
    """In a fresh process (registration is global): register() covers every op with a Triton kernel."""
    import subprocess
    import sys

    code = (
        "import npu_ft.ops as ops\n"
        "from npu_ft.ops import _registry\n"
        "from npu_ft.ops.backends import cuda\n"
        "if 'cuda' not in ops.loaded_backends():\n"
        "    cuda.register()\n"
        "names = sorted(op for op, kernels in _registry.REGISTERED.items() if 'cuda' in kernels)\n"
        "print(','.join(names))\n"
    )
    env = dict(os.environ, NPU_FT_KERNELS="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    from npu_ft.ops.backends.cuda import adamw8bit as A8
    from npu_ft.ops.backends.cuda import block_ops, methods

    expected = sorted([*Q.KERNELS, *K.KERNELS, *A8.KERNELS, *block_ops.KERNELS, *methods.KERNELS])
    assert out.stdout.strip().split(",") == expected


@pytest.mark.slow
def test_kernels_compile_for_h100_without_a_gpu():
    """Triton's whole GPU pipeline (down to a cubin via the wheel's ptxas) for sm_90, no GPU needed."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "npu_ft.ops.backends.cuda._aot", "90"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # 6 + adamw8bit_update fp32, bf16 + the 10 decoder-block kernels + the 3 DoRA kernels
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 21, out.stdout
    assert {line.split(" (")[0] for line in lines} >= {"dora_row_norm", "dora_scale bf16", "dora_grad bf16"}


# ------------------------------------------------------------------------------------------------
# real GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_dispatch_reaches_the_triton_kernels():
    import npu_ft.ops as ops

    assert "cuda" in ops.loaded_backends(), ops.BACKEND_STATUS
    ops.reset_kernel_calls()
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(32, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, _ = torch.ops.npu_ft.lora_linear(x, w, None, A, B, 2.0, None)
    y.float().sum().backward()
    assert ops.kernel_calls("lora_linear").get("cuda") == 1
    assert ops.kernel_calls("lora_linear_backward").get("cuda") == 1
    for name in ("nf4_quantize", "nf4_dequantize"):
        if hasattr(torch.ops.npu_ft, name):
            ops.reset_kernel_calls()
            packed, absmax = torch.ops.npu_ft.nf4_quantize(w, 64)
            torch.ops.npu_ft.nf4_dequantize(packed, absmax, 64, [32, 64], torch.bfloat16)
            assert ops.kernel_calls(name).get("cuda") == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_large_lora_linear_matches_reference(dtype):
    from npu_ft.ops import lora as L

    x, weight, bias, A, B, _ = _lora_inputs((4, 257), 1031, 2053, 16, dtype, dtype, seed=31, dropout=False)
    y, _ = K.lora_linear(x, weight, bias, A, B, 2.0, None)
    y_ref, _ = L.lora_linear_reference(x, weight, bias, A, B, 2.0, None)
    _close(y, y_ref, 3e-2)


@pytest.mark.cuda
def test_cuda_nf4_bytes_match_bnb_on_cpu_for_large_tensor():
    F = _bnb()
    A = torch.randn(4099, 1031, device="cuda", dtype=torch.bfloat16)
    packed, absmax = Q.nf4_quantize(A, 64)
    ref_packed, state = F.quantize_4bit(A.cpu(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed.cpu(), ref_packed.view(torch.uint8))
    assert torch.equal(absmax.cpu(), state.absmax)
