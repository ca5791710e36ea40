"""npu kernels (npu_ft/ops/backends/npu) on an npu device.

Here the device is the test suite's fake npu (tests/fake_npu: host memory, ATen ops through the
CPU fallback), which proves that npu tensors reach the npu kernels (not the reference), that the
results match the reference on the CPU, and that autograd, dtypes and devices flow. The same tests
run on a real Ascend NPU under the ``ascend`` marker (deselected elsewhere); only those runs say
anything about torch_npu's own kernels.

Tolerances: NF4 / 8-bit ops are bit-exact (same float operations as the reference). The LoRA ops
fuse the bias and the LoRA product into addmm calls, so they differ from the oracle only by
summation order: each op's tolerance table in the op registry (``_registry.tolerance``).
"""

from __future__ import annotations

import math

import pytest
import torch

import npu_ft.ops
from npu_ft.ops import _registry, kernel_calls, loaded_backends, reset_kernel_calls
from npu_ft.ops import lora as lora_ops
from npu_ft.ops import nf4 as nf4_ops
from tests.fake_npu.fixtures import fake_npu  # noqa: F401  (module-scoped fixture)

NPU_OPS = (
    "nf4_quantize", "nf4_dequantize", "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
    "lora_linear", "lora_linear_backward", "nf4_linear", "nf4_linear_backward",
)
# awkward sizes: odd numel, partial last blocks, rank 1, 3-D activations
NF4_SHAPES = [(1,), (3,), (7, 13), (65,), (129, 33), (2, 3, 67)]
LINEAR_CASES = [  # (lead dims of x, in, out, r)
    ((5,), 13, 7, 3),
    ((2, 9), 33, 17, 1),
    ((), 64, 48, 8),
    ((3, 1, 4), 100, 3, 5),
]


@pytest.fixture(scope="module", params=["fake", pytest.param("ascend", marks=pytest.mark.ascend)])
def npu(request):
    """An npu device with npu-ft's npu kernels registered: the fake one, or a real Ascend NPU."""
    if request.param == "fake":
        return request.getfixturevalue("fake_npu")
    from npu_ft.device import get_backend

    device = get_backend("npu").torch_device(0)
    npu_ft.ops.register_available_backends()
    return device


@pytest.fixture
def calls():
    reset_kernel_calls()
    yield kernel_calls


def _only_npu(op: str) -> None:
    seen = kernel_calls(op)
    assert seen.get("npu", 0) >= 1, f"{op}: npu kernel not called ({seen})"
    assert seen.get("reference", 0) == 0, f"{op}: the reference ran on npu tensors ({seen})"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- registration ------------------------------------------------------------------------------
def test_npu_kernels_are_registered(npu):
    assert "npu" in loaded_backends()
    for op in NPU_OPS:
        if hasattr(torch.ops.npu_ft, op):
            assert "npu" in _registry.REGISTERED[op], f"{op} has no npu kernel"


def test_cpu_tensors_do_not_reach_npu_kernels(npu, calls):
    A = torch.randn(8, 64)
    packed, absmax = nf4_ops.nf4_quantize(A, 64)
    nf4_ops.nf4_dequantize(packed, absmax, 64, A.shape)
    for op in ("nf4_quantize", "nf4_dequantize"):
        assert "npu" not in kernel_calls(op)


# -- NF4 / 8-bit: bit-exact with the reference -------------------------------------------------
@pytest.mark.parametrize("shape", NF4_SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nf4_quantize_dequantize_match_reference(npu, calls, shape, blocksize, dtype):
    A = (torch.randn(shape, generator=_gen(math.prod(shape) + blocksize)) * 3).to(dtype)
    if A.numel() > blocksize:
        A.view(-1)[:blocksize] = 0  # an all-zero block
    ref_packed, ref_absmax = nf4_ops.nf4_quantize_reference(A, blocksize)
    packed, absmax = nf4_ops.nf4_quantize(A.to(npu), blocksize)
    _only_npu("nf4_quantize")
    assert packed.device.type == "npu" and packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert absmax.device.type == "npu" and absmax.dtype == torch.float32
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(absmax.cpu(), ref_absmax)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = nf4_ops.nf4_dequantize_reference(ref_packed, ref_absmax, blocksize, shape, out_dtype)
        got = nf4_ops.nf4_dequantize(packed, absmax, blocksize, shape, out_dtype)
        assert got.device.type == "npu" and got.dtype == out_dtype and got.shape == torch.Size(shape)
        assert torch.equal(got.cpu(), ref)
    _only_npu("nf4_dequantize")


@pytest.mark.parametrize("numel", [1, 255, 256, 1000, 4099])
def test_8bit_blockwise_match_reference(npu, calls, numel):
    A = torch.randn(numel, generator=_gen(numel)) * 5
    if numel >= 512:
        A[256:512] = 0
    code = nf4_ops.dynamic_code_8bit()
    ref_q, ref_absmax = nf4_ops.quantize_blockwise_8bit_reference(A, code, 256)
    q, absmax = nf4_ops.quantize_blockwise_8bit(A.to(npu), code.to(npu), 256)
    _only_npu("quantize_blockwise_8bit")
    assert q.device.type == "npu" and q.dtype == torch.uint8
    assert torch.equal(q.cpu(), ref_q) and torch.equal(absmax.cpu(), ref_absmax)
    for dtype in (torch.float32, torch.bfloat16):
        ref = nf4_ops.dequantize_blockwise_8bit_reference(ref_q, ref_absmax, code, 256, dtype)
        got = nf4_ops.dequantize_blockwise_8bit(q, absmax, code.to(npu), 256, dtype)
        assert got.dtype == dtype and torch.equal(got.cpu(), ref)
    _only_npu("dequantize_blockwise_8bit")


def test_double_quantized_weight_moves_between_devices(npu, calls):
    W = torch.randn(48, 40, generator=_gen(7))
    packed_cpu, state_cpu = nf4_ops.quantize_nf4(W)
    packed_npu, state_npu = nf4_ops.quantize_nf4(W.to(npu))
    assert torch.equal(packed_npu.cpu(), packed_cpu)
    assert torch.equal(state_npu.qabsmax.cpu(), state_cpu.qabsmax)
    # quantized on the CPU, dequantized on the npu (and back): identical weights
    on_npu = nf4_ops.dequantize_nf4(packed_cpu.to(npu), state_cpu.to(npu), torch.bfloat16)
    assert torch.equal(on_npu.cpu(), nf4_ops.dequantize_nf4(packed_cpu, state_cpu, torch.bfloat16))


# -- LoRA linear -------------------------------------------------------------------------------
def _lora_inputs(lead, in_f, out_f, r, dtype, lora_dtype, bias, seed):
    g = _gen(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    W = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    A = (torch.randn(r, in_f, generator=g) / math.sqrt(in_f)).to(lora_dtype)
    B = torch.randn(out_f, r, generator=g).to(lora_dtype)
    return x, W, b, A, B


def _to(device, *tensors, grad=False):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t.detach().to(device)
        out.append(t.requires_grad_() if grad and t.is_floating_point() else t)
    return out


@pytest.mark.parametrize("lead,in_f,out_f,r", LINEAR_CASES, ids=str)
@pytest.mark.parametrize(
    "dtype,lora_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
     (torch.float16, torch.float16)],
    ids=["fp32", "bf16", "bf16+fp32-lora", "fp16"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lora_linear_forward_backward(npu, calls, lead, in_f, out_f, r, dtype, lora_dtype, bias):
    x, W, b, A, B = _lora_inputs(lead, in_f, out_f, r, dtype, lora_dtype, bias, seed=in_f * out_f + r)
    scaling = 2.0 / r
    # reference: plain torch on the CPU, differentiated by autograd
    xc, bc, Ac, Bc = _to("cpu", x, b, A, B, grad=True)
    y_ref, _ = lora_ops.lora_linear_reference(xc, W, bc, Ac, Bc, scaling, None)
    grad = torch.randn(y_ref.shape, generator=_gen(3)).to(dtype)
    y_ref.backward(grad)

    xn, bn, An, Bn = _to(npu, x, b, A, B, grad=True)
    y = lora_ops.lora_linear(xn, W.to(npu), bn, An, Bn, scaling)
    assert y.device.type == "npu" and y.dtype == dtype and y.shape == y_ref.shape
    y.backward(grad.to(npu))
    _only_npu("lora_linear")
    _only_npu("lora_linear_backward")

    _registry.tolerance("lora_linear", dtype).assert_close(y.detach().cpu(), y_ref.detach())
    for name, got, ref in (("x", xn, xc), ("A", An, Ac), ("B", Bn, Bc), ("bias", bn, bc)):
        if ref is None:
            continue
        assert got.grad is not None, f"no gradient for {name}"
        assert got.grad.device.type == "npu" and got.grad.dtype == got.dtype, name
        _registry.tolerance("lora_linear_backward", dtype).assert_close(got.grad.cpu(), ref.grad, msg=name)


def test_lora_linear_with_dropout_input(npu, calls):
    x, W, b, A, B = _lora_inputs((4, 6), 24, 10, 4, torch.float32, torch.float32, True, seed=11)
    keep = (torch.rand(x.shape, generator=_gen(5)) > 0.3).float() / 0.7  # a fixed dropout mask
    xc, Ac, Bc = _to("cpu", x, A, B, grad=True)
    y_ref, _ = lora_ops.lora_linear_reference(xc, W, b, Ac, Bc, 0.5, xc * keep)
    y_ref.sum().backward()
    xn, An, Bn = _to(npu, x, A, B, grad=True)
    y = lora_ops.lora_linear(xn, W.to(npu), b.to(npu), An, Bn, 0.5, xn * keep.to(npu))
    y.sum().backward()
    _only_npu("lora_linear_backward")
    _registry.tolerance("lora_linear", torch.float32).assert_close(y.detach().cpu(), y_ref.detach())
    for got, ref in ((xn, xc), (An, Ac), (Bn, Bc)):
        _registry.tolerance("lora_linear_backward", torch.float32).assert_close(got.grad.cpu(), ref.grad)


# -- QLoRA linear ------------------------------------------------------------------------------
@pytest.mark.parametrize("lead,in_f,out_f,r", LINEAR_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_nf4_linear_forward_backward(npu, calls, lead, in_f, out_f, r, dtype, double_quant):
    x, W, b, A, B = _lora_inputs(lead, in_f, out_f, r, dtype, dtype, True, seed=in_f + out_f * r)
    packed, state = nf4_ops.quantize_nf4(W, blocksize=32, double_quant=double_quant)
    scaling = 0.75
    xc, bc, Ac, Bc = _to("cpu", x, b, A, B, grad=True)
    y_ref, _ = lora_ops.nf4_linear_reference(
        xc, packed, state.absmax_fp32(), 32, list(W.shape), bc, Ac, Bc, scaling, None
    )
    y_ref.sum().backward()

    xn, bn, An, Bn = _to(npu, x, b, A, B, grad=True)
    reset_kernel_calls()
    y = lora_ops.nf4_linear(xn, packed.to(npu), state.to(npu), bn, An, Bn, scaling)
    assert y.device.type == "npu" and y.dtype == dtype and y.shape == y_ref.shape
    y.sum().backward()
    for op in ("nf4_linear", "nf4_linear_backward", "nf4_dequantize"):
        _only_npu(op)
    _registry.tolerance("nf4_linear", dtype).assert_close(y.detach().cpu(), y_ref.detach())
    for name, got, ref in (("x", xn, xc), ("A", An, Ac), ("B", Bn, Bc), ("bias", bn, bc)):
        assert got.grad is not None and got.grad.device.type == "npu" and got.grad.dtype == dtype, name
        _registry.tolerance("nf4_linear_backward", dtype).assert_close(got.grad.cpu(), ref.grad, msg=name)


def test_nf4_linear_without_lora(npu, calls):
    x, W, b, _, _ = _lora_inputs((3,), 40, 9, 1, torch.bfloat16, torch.bfloat16, False, seed=2)
    packed, state = nf4_ops.quantize_nf4(W)
    ref = torch.nn.functional.linear(x, nf4_ops.dequantize_nf4(packed, state, torch.bfloat16))
    xn = x.to(npu).requires_grad_()
    y = lora_ops.nf4_linear(xn, packed.to(npu), state.to(npu))
    y.sum().backward()
    _only_npu("nf4_linear")
    assert xn.grad.device.type == "npu" and xn.grad.dtype == torch.bfloat16
    _registry.tolerance("nf4_linear", torch.bfloat16).assert_close(y.detach().cpu(), ref)


def test_npu_kernels_do_not_hold_full_size_weights(npu):
    """The frozen NF4 weight is rebuilt per call and dropped: nothing weight-sized stays allocated."""
    from npu_ft.device import backend_for_tensor

    x, W, b, A, B = _lora_inputs((4,), 256, 512, 4, torch.float32, torch.float32, False, seed=9)
    packed, state = nf4_ops.quantize_nf4(W.to(npu))
    dev = backend_for_tensor(packed)
    xn, An, Bn = _to(npu, x, A, B, grad=True)
    lora_ops.nf4_linear(xn, packed, state, None, An, Bn, 1.0).sum().backward()  # warm caches
    dev.synchronize()
    before = dev.memory().current_bytes
    for _ in range(3):
        lora_ops.nf4_linear(xn, packed, state, None, An, Bn, 1.0).sum().backward()
    dev.synchronize()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (xn, An, Bn))
    # gradients accumulate in place; a kept dequantized weight would add 512 KiB per call
    assert dev.memory().current_bytes - before <= grads


# -- opcheck on npu tensors --------------------------------------------------------------------
def _opcheck_cases(device):
    g = _gen(21)
    x = torch.randn(3, 5, 16, generator=g).to(device)
    W = torch.randn(8, 16, generator=g).to(device)
    b = torch.randn(8, generator=g).to(device)
    A = torch.randn(4, 16, generator=g).to(device).requires_grad_()
    B = torch.randn(8, 4, generator=g).to(device).requires_grad_()
    Wq = torch.randn(7, 13, generator=g).to(device)
    packed, absmax = nf4_ops.nf4_quantize(Wq, 32)
    code = nf4_ops.dynamic_code_8bit(device)
    q, qabsmax = nf4_ops.quantize_blockwise_8bit(torch.randn(300, generator=g).to(device), code, 256)
    xw = torch.randn(2, 13, generator=g).to(device)
    A13 = torch.randn(2, 13, generator=g).to(device).requires_grad_()
    B7 = torch.randn(7, 2, generator=g).to(device).requires_grad_()
    return {
        "nf4_quantize": (Wq, 32),
        "nf4_dequantize": (packed, absmax, 32, [7, 13], torch.bfloat16),
        "quantize_blockwise_8bit": (torch.randn(300, generator=g).to(device), code, 256),
        "dequantize_blockwise_8bit": (q, qabsmax, code, 256, torch.float32),
        "lora_linear": (x, W, b, A, B, 0.5, None),
        "nf4_linear": (xw, packed, absmax, 32, [7, 13], None, A13, B7, 2.0, None),
    }


@pytest.mark.parametrize(
    "op", ["nf4_quantize", "nf4_dequantize", "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
           "lora_linear", "nf4_linear"]
)
def test_opcheck_on_npu(npu, op):
    args = _opcheck_cases(npu)[op]
    # torch's autograd-registration check only knows CPU/CUDA/XPU tensors ("NYI devices other than
    # CPU/CUDA/XPU"); the autograd tests above cover it on npu tensors
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(torch.ops.npu_ft, op).default, args, test_utils=utils)
