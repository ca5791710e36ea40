"""NF4 / 8-bit blockwise ops: CPU kernels against the reference, opcheck, argument errors, state.

Byte-compatibility with bitsandbytes itself is in test_nf4_bnb_compat.py.
"""

from __future__ import annotations

import pytest
import torch

import npu_ft.ops  # noqa: F401  (registers the backends)
from npu_ft.ops import _registry, nf4
from npu_ft.ops.backends.cpu import _native
from npu_ft.ops.backends.cpu import nf4 as cpu_nf4

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
AWKWARD_SHAPES = [(1,), (7,), (33, 65), (3, 1000, 5), (4097,), (64, 64), (2, 4096)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(3) * 3
    flat = w.view(-1)
    if flat.numel() >= 256:
        flat[:64] = 0.0  # an all-zero block
        flat[100] = 1e-30  # a tiny value
    return w.to(dtype)


@pytest.fixture(params=["native", "torch"])
def cpu_path(request, monkeypatch):
    """Run the CPU kernel through its native C code and through its pure-torch fallback."""
    if request.param == "torch":
        monkeypatch.setenv(_native.ENV_NATIVE, "0")
    elif _native.native_ops() is None:
        pytest.skip(f"native CPU kernels unavailable: {_native.unavailable_reason()}")
    return request.param


# ------------------------------------------------------------------------------------------
# code tables
# ------------------------------------------------------------------------------------------


def test_nf4_code_table():
    assert NF4 == tuple(nf4.NF4_CODE.tolist())
    assert nf4.NF4_CODE.dtype == torch.float32 and nf4.NF4_CODE.shape == (16,)
    assert torch.all(nf4.NF4_CODE[1:] > nf4.NF4_CODE[:-1])
    assert nf4.NF4_CODE[7].item() == 0.0


NF4 = tuple(float(v) for v in torch.tensor(nf4._NF4_VALUES, dtype=torch.float32).tolist())


def test_dynamic_code_8bit():
    code = nf4.dynamic_code_8bit()
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.all(code[1:] >= code[:-1])
    assert code[-1].item() == 1.0 and code.min().item() > -1.0
    assert (code == 0).sum().item() == 1
    assert nf4.dynamic_code_8bit() is code  # cached per device


# ------------------------------------------------------------------------------------------
# reference semantics
# ------------------------------------------------------------------------------------------


def test_reference_round_trip_error_is_bounded():
    w = torch.randn(64, 128)
    packed, absmax = nf4.nf4_quantize_reference(w, 64)
    assert packed.shape == (64 * 128 // 2, 1) and packed.dtype == torch.uint8
    assert absmax.shape == (128,) and torch.equal(absmax, w.view(-1, 64).abs().amax(1))
    back = nf4.nf4_dequantize_reference(packed, absmax, 64, w.shape, torch.float32)
    # nearest NF4 level: error at most half the widest gap (0.3038) times absmax
    err = (back - w).abs().view(-1, 64) / absmax.unsqueeze(1)
    assert err.max().item() <= 0.3039 / 2 + 1e-6


def test_reference_packing_order_and_ties():
    # values exactly on codes, and one exactly on a midpoint (goes to the lower code)
    code = nf4.NF4_CODE
    mid = ((code[3] + code[4]) / 2).item()
    w = torch.tensor([1.0, code[0].item(), code[8].item(), 0.0, mid, code[14].item(), 0.0])
    packed, absmax = nf4.nf4_quantize_reference(w, 32)
    assert absmax.tolist() == [pytest.approx(1.0)]  # partial block: its own absmax
    assert packed.view(-1).tolist() == [0xF0, 0x87, 0x3E, 0x77]  # high nibble first, pad code 7


def test_reference_zero_blocks():
    w = torch.zeros(100)
    packed, absmax = nf4.nf4_quantize_reference(w, 64)
    assert absmax[0].item() == 0.0  # full block: plain absmax
    assert absmax[1].item() == pytest.approx(1e-38, rel=1e-3)  # partial block: clamped (bitsandbytes)
    assert torch.all(packed == 0x77)
    assert torch.all(nf4.nf4_dequantize_reference(packed, absmax, 64, w.shape, torch.float32) == 0)


def test_reference_8bit_round_trip():
    code = nf4.dynamic_code_8bit()
    x = torch.randn(1000)
    q, absmax = nf4.quantize_blockwise_8bit_reference(x, code, 256)
    assert q.shape == x.shape and q.dtype == torch.uint8 and absmax.shape == (4,)
    back = nf4.dequantize_blockwise_8bit_reference(q, absmax, code, 256, torch.float32)
    assert torch.allclose(back, x, atol=0.02 * x.abs().max().item())
    zq, zabs = nf4.quantize_blockwise_8bit_reference(torch.zeros(300), code, 256)
    assert torch.all(zq == 0) and torch.all(zabs == 0)


# ------------------------------------------------------------------------------------------
# CPU kernel == reference (exact: same float ops, same rounding)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", AWKWARD_SHAPES)
def test_cpu_nf4_matches_reference(shape, dtype, cpu_path):
    w = _weight(shape, dtype, seed=len(shape))
    for blocksize in (32, 64, 4096):
        ref_p, ref_a = nf4.nf4_quantize_reference(w, blocksize)
        p, a = cpu_nf4.nf4_quantize_cpu(w, blocksize)
        assert torch.equal(p, ref_p) and torch.equal(a, ref_a), blocksize
        for out_dtype in FLOATS if blocksize == 64 else (dtype,):
            ref = nf4.nf4_dequantize_reference(ref_p, ref_a, blocksize, shape, out_dtype)
            got = cpu_nf4.nf4_dequantize_cpu(ref_p, ref_a, blocksize, shape, out_dtype)
            assert got.shape == torch.Size(shape) and got.dtype == out_dtype
            assert torch.equal(got, ref), (blocksize, out_dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_cpu_8bit_matches_reference(dtype, cpu_path):
    code = nf4.dynamic_code_8bit()
    for shape in [(1,), (255,), (3, 700), (8192,)]:
        x = _weight(shape, dtype, seed=shape[-1])
        for blocksize in (64, 256, 4096):
            ref_q, ref_a = nf4.quantize_blockwise_8bit_reference(x, code, blocksize)
            q, a = cpu_nf4.quantize_blockwise_8bit_cpu(x, code, blocksize)
            assert torch.equal(q, ref_q) and torch.equal(a, ref_a)
            for out_dtype in FLOATS:
                ref = nf4.dequantize_blockwise_8bit_reference(ref_q, ref_a, code, blocksize, out_dtype)
                assert torch.equal(cpu_nf4.dequantize_blockwise_8bit_cpu(ref_q, ref_a, code, blocksize, out_dtype), ref)


def test_cpu_float_conversions_exact_over_wide_range():
    """Scales spanning fp16 subnormals to overflow, plus inf/nan absmax: C casts == torch casts."""
    if _native.native_ops() is None:
        pytest.skip("native CPU kernels unavailable")
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (64 * 2048,), dtype=torch.uint8, generator=g)
    absmax = torch.exp(torch.empty(2048).uniform_(-40, 15, generator=g))
    absmax[:6] = torch.tensor([float("inf"), float("nan"), 0.0, 65504.0, 65520.0, 6e-8])
    code = torch.sort(torch.randn(256, generator=g)).values
    code = code / code.abs().max()
    for out_dtype in (torch.float16, torch.bfloat16):
        ref = nf4.dequantize_blockwise_8bit_reference(q, absmax, code, 64, out_dtype)
        got = cpu_nf4.dequantize_blockwise_8bit_cpu(q, absmax, code, 64, out_dtype)
        same = (ref.view(torch.int16) == got.view(torch.int16)) | (ref.isnan() & got.isnan())
        assert bool(same.all()), out_dtype
    # every bf16 / fp16 bit pattern as NF4 input (inputs converted to float32 exactly)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = bits.view(dtype).clone()
        x[~torch.isfinite(x)] = 0.5
        pairs = zip(nf4.nf4_quantize_reference(x, 64), cpu_nf4.nf4_quantize_cpu(x, 64), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


def test_cpu_kernel_is_dispatched():
    if "cpu" not in _registry.REGISTERED["nf4_dequantize"]:
        pytest.skip("cpu kernels disabled by NPU_FT_KERNELS")
    _registry.reset_kernel_calls()
    packed, state = nf4.quantize_nf4(torch.randn(64, 64), 64, double_quant=True)
    nf4.dequantize_nf4(packed, state)
    for op in ("nf4_quantize", "nf4_dequantize", "quantize_blockwise_8bit", "dequantize_blockwise_8bit"):
        assert _registry.kernel_calls(op).get("cpu", 0) >= 1, op


def test_cpu_multithreaded_split_matches_single_thread():
    w = _weight((1024, 1024), torch.bfloat16, seed=9)  # above the fan-out thresholds (2**16, 2**19 values)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p1, a1 = cpu_nf4.nf4_quantize_cpu(w, 64)
        d1 = cpu_nf4.nf4_dequantize_cpu(p1, a1, 64, w.shape, torch.bfloat16)
        torch.set_num_threads(3)
        p3, a3 = cpu_nf4.nf4_quantize_cpu(w, 64)
        d3 = cpu_nf4.nf4_dequantize_cpu(p3, a3, 64, w.shape, torch.bfloat16)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(p1, p3) and torch.equal(a1, a3) and torch.equal(d1, d3)


# ------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------

OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("shape", [(7,), (33, 65), (128,)])
def test_opcheck(shape):
    w = _weight(shape, torch.bfloat16, seed=1)
    code = nf4.dynamic_code_8bit()
    n = w.numel()
    packed, absmax = torch.ops.npu_ft.nf4_quantize(w, 32)
    q, qabs = torch.ops.npu_ft.quantize_blockwise_8bit(w.float(), code, 64)
    torch.library.opcheck(torch.ops.npu_ft.nf4_quantize.default, (w, 32), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(
        torch.ops.npu_ft.nf4_dequantize.default,
        (packed, absmax, 32, list(shape), torch.float16),
        test_utils=OPCHECK_TESTS,
    )
    torch.library.opcheck(
        torch.ops.npu_ft.quantize_blockwise_8bit.default, (w.float(), code, 64), test_utils=OPCHECK_TESTS
    )
    torch.library.opcheck(
        torch.ops.npu_ft.dequantize_blockwise_8bit.default,
        (q, qabs, code, 64, torch.bfloat16),
        test_utils=OPCHECK_TESTS,
    )
    assert packed.shape == ((n + 1) // 2, 1)


# ------------------------------------------------------------------------------------------
# Python API and Nf4QuantState
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_dequantize_api(double_quant):
    w = _weight((96, 80), torch.bfloat16, seed=4)
    packed, state = nf4.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert state.nested is double_quant and state.shape == w.shape and state.dtype == torch.bfloat16
    assert state.num_blocks == 120
    if double_quant:
        assert state.qabsmax.dtype == torch.uint8 and state.nested_absmax.shape == (1,)
        assert state.offset.dim() == 0 and state.nested_blocksize == 256
        plain = nf4.nf4_quantize_reference(w, 64)[1]
        assert torch.allclose(state.absmax_fp32(), plain, rtol=0, atol=0.02 * plain.max().item())
    out = nf4.dequantize_nf4(packed, state)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert nf4.dequantize_nf4(packed, state, torch.float32).dtype == torch.float32
    assert torch.equal(out, nf4.nf4_dequantize_reference(packed, state.absmax_fp32(), 64, w.shape, torch.bfloat16))
    assert (out.float() - w.float()).abs().max().item() < 0.25 * w.float().abs().max().item()


def test_state_to_device_and_bnb_dict_round_trip():
    packed, state = nf4.quantize_nf4(torch.randn(40, 72), 128, double_quant=True)
    moved = state.to("cpu")
    assert moved is not state and torch.equal(moved.qabsmax, state.qabsmax)
    for packed_format in (True, False):
        d = state.to_bnb_dict(prefix="layer.weight.", packed=packed_format)
        back = nf4.Nf4QuantState.from_bnb_dict({"other": torch.ones(1), **d}, prefix="layer.weight.")
        assert back.shape == state.shape and back.dtype == state.dtype and back.blocksize == 128
        assert torch.equal(back.qabsmax, state.qabsmax) and torch.equal(back.offset, state.offset)
        assert torch.equal(nf4.dequantize_nf4(packed, back), nf4.dequantize_nf4(packed, state))
    assert set(state.to_bnb_dict()) == {
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state.bitsandbytes__nf4",
    }


# ------------------------------------------------------------------------------------------
# argument errors: raised before any kernel, message starts with the argument name
# ------------------------------------------------------------------------------------------


def _errors(fn, exc, name):
    _registry.reset_kernel_calls()
    with pytest.raises(exc) as info:
        fn()
    assert str(info.value).startswith(name), str(info.value)
    assert not _registry.KERNEL_CALLS, "a kernel ran before the check"


def test_bad_inputs():
    w = torch.randn(8, 64)
    packed, state = nf4.quantize_nf4(w, 64, double_quant=False)
    _, nested = nf4.quantize_nf4(w, 64, double_quant=True)
    absmax = state.absmax
    _errors(lambda: nf4.quantize_nf4(w.double()), TypeError, "weight")
    _errors(lambda: nf4.quantize_nf4(w.to(torch.int32)), TypeError, "weight")
    _errors(lambda: nf4.quantize_nf4([1.0, 2.0]), TypeError, "weight")
    _errors(lambda: nf4.quantize_nf4(torch.empty(0)), ValueError, "weight")
    for bad in (48, 16, 8192, 0, -64):
        _errors(lambda: nf4.quantize_nf4(w, blocksize=bad), ValueError, "blocksize")
    _errors(lambda: nf4.quantize_nf4(w, blocksize=64.0), TypeError, "blocksize")
    _errors(lambda: nf4.quantize_nf4(w, double_quant=1), TypeError, "double_quant")
    _errors(lambda: nf4.nf4_quantize(w.half(), 100), ValueError, "blocksize")
    _errors(lambda: nf4.dequantize_nf4(packed.to(torch.int8), state), TypeError, "packed")
    _errors(lambda: nf4.dequantize_nf4(packed[:-1], state), ValueError, "packed")
    _errors(lambda: nf4.dequantize_nf4(packed, "state"), TypeError, "state")
    _errors(lambda: nf4.dequantize_nf4(packed, state, torch.int32), TypeError, "dtype")
    bad_state = nf4.Nf4QuantState(shape=w.shape, dtype=w.dtype, blocksize=64, absmax=absmax[:-1])
    _errors(lambda: nf4.dequantize_nf4(packed, bad_state), ValueError, "state.absmax")
    bad_state = nf4.Nf4QuantState(shape=w.shape, dtype=w.dtype, blocksize=64, absmax=absmax.half())
    _errors(lambda: nf4.dequantize_nf4(packed, bad_state), TypeError, "state.absmax")
    bad_nested = nf4.Nf4QuantState(**{**nested.__dict__, "nested_absmax": nested.nested_absmax.repeat(2)})
    _errors(lambda: nf4.dequantize_nf4(packed, bad_nested), ValueError, "state.nested_absmax")
    bad_nested = nf4.Nf4QuantState(**{**nested.__dict__, "nested_code": nested.nested_code[:16]})
    _errors(lambda: nf4.dequantize_nf4(packed, bad_nested), ValueError, "state.nested_code")
    # low-level entry points
    _errors(lambda: nf4.nf4_dequantize(packed, absmax.double(), 64, w.shape), TypeError, "absmax")
    _errors(lambda: nf4.nf4_dequantize(packed, absmax[:3], 64, w.shape), ValueError, "absmax")
    _errors(lambda: nf4.nf4_dequantize(packed, absmax, 64, (8, 63)), ValueError, "packed")
    _errors(lambda: nf4.nf4_dequantize(packed, absmax, 64, (8, 0)), ValueError, "shape")
    _errors(lambda: nf4.nf4_dequantize(packed, absmax, 64, w.shape, "float32"), TypeError, "dtype")
    _errors(lambda: nf4.quantize_blockwise_8bit(w, blocksize=32), ValueError, "blocksize")
    _errors(lambda: nf4.quantize_blockwise_8bit(w, code=torch.zeros(255)), ValueError, "code")
    _errors(lambda: nf4.quantize_blockwise_8bit(w, code=torch.zeros(256, dtype=torch.float64)), TypeError, "code")
    q, qabs = nf4.quantize_blockwise_8bit(w)
    _errors(lambda: nf4.dequantize_blockwise_8bit(q.float(), qabs), TypeError, "q")
    _errors(lambda: nf4.dequantize_blockwise_8bit(q, qabs.repeat(2)), ValueError, "absmax")
    _errors(lambda: nf4.dequantize_blockwise_8bit(q, qabs, dtype=torch.int8), TypeError, "dtype")
    with pytest.raises(ValueError, match="^absmax"):
        nf4.Nf4QuantState(shape=w.shape, dtype=w.dtype)


def test_device_mix_is_rejected():
    meta_absmax = torch.empty(8, dtype=torch.float32, device="meta")
    packed = torch.zeros(256, 1, dtype=torch.uint8)
    _errors(lambda: nf4.nf4_dequantize(packed, meta_absmax, 64, (8, 64)), ValueError, "absmax")
    state = nf4.Nf4QuantState(shape=(8, 64), dtype=torch.float32, blocksize=64, absmax=meta_absmax)
    _errors(lambda: nf4.dequantize_nf4(packed, state), ValueError, "state.absmax")
    w = torch.randn(300)
    _errors(lambda: nf4.quantize_blockwise_8bit(w, code=torch.zeros(256, device="meta")), ValueError, "code")


def test_from_bnb_dict_rejects_other_formats():
    _, state = nf4.quantize_nf4(torch.randn(64), 64, double_quant=False)
    d = state.to_bnb_dict(packed=False)
    with pytest.raises(ValueError, match="^quant_type"):
        nf4.Nf4QuantState.from_bnb_dict({**d, "quant_type": "fp4"})
    with pytest.raises(ValueError, match="^quant_map"):
        nf4.Nf4QuantState.from_bnb_dict({**d, "quant_map": torch.linspace(-1, 1, 16)})
    with pytest.raises(ValueError, match="^absmax"):
        nf4.Nf4QuantState.from_bnb_dict({k: v for k, v in d.items() if k != "absmax"})
    with pytest.raises(ValueError, match="^absmax"):
        nf4.Nf4QuantState.from_bnb_dict({**d, "absmax": d["absmax"].repeat(2)})
    with pytest.raises(ValueError, match="^quant_state.bitsandbytes__fp4"):
        nf4.Nf4QuantState.from_bnb_dict({"quant_state.bitsandbytes__fp4": torch.zeros(2, dtype=torch.uint8)})
