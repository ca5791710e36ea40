"""Byte-compatibility of npu-ft's NF4 format with bitsandbytes (CPU path of bitsandbytes 0.50).

Quantized bytes, absmax, double-quantized statistics and the saved state-dict entries must be
identical, and dequantized values equal, so checkpoints move freely between the two.
"""

from __future__ import annotations

import pytest
import torch

bnb_f = pytest.importorskip("bitsandbytes.functional")

import npu_ft.ops  # noqa: E402,F401
from npu_ft.ops import nf4  # noqa: E402

from ._bnb_reference import bnb_dequantize_4bit

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(1,), (7,), (33, 65), (3, 1000, 5), (4097,), (128, 64)]


@pytest.fixture(autouse=True)
def _no_dynamo():
    # bitsandbytes torch.compile()s its pure-torch dequantize (odd last dims on CPU): skip the
    # minutes-long compile, the eager code computes the same values. (torch's own config.patch:
    # pytest's monkeypatch undo can delattr the key out of torch's ConfigModule.)
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(2) * 2
    if w.numel() > 200:
        w.view(-1)[64:128] = 0.0
    return w.to(dtype)


def _assert_same_state(ours: nf4.Nf4QuantState, theirs) -> None:
    assert tuple(ours.shape) == tuple(theirs.shape) and ours.dtype == theirs.dtype
    assert ours.blocksize == theirs.blocksize and theirs.quant_type == "nf4"
    assert torch.equal(theirs.code, nf4.NF4_CODE)
    if theirs.nested:
        assert ours.nested
        assert torch.equal(ours.qabsmax, theirs.absmax)
        assert torch.equal(ours.nested_absmax, theirs.state2.absmax)
        assert torch.equal(ours.nested_code, theirs.state2.code)
        assert ours.nested_blocksize == theirs.state2.blocksize
        assert torch.equal(ours.offset, theirs.offset)
    else:
        assert not ours.nested and torch.equal(ours.absmax, theirs.absmax)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_bytes_equal_bnb(shape, dtype):
    w = _weight(shape, dtype, seed=len(shape) + shape[0])
    for blocksize in nf4.BLOCKSIZES_4BIT:
        double_quant = blocksize in (64, 256, 4096)
        theirs_packed, theirs = bnb_f.quantize_4bit(
            w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
        )
        packed, state = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        assert packed.shape == theirs_packed.shape and torch.equal(packed, theirs_packed), blocksize
        _assert_same_state(state, theirs)


def test_quantize_large_double_quant_equal_bnb():
    w = _weight((512, 1024), torch.bfloat16, seed=5)  # 8192 blocks: several nested blocks
    theirs_packed, theirs = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(packed, theirs_packed)
    _assert_same_state(state, theirs)


@pytest.mark.parametrize("shape", [(33, 65), (4097,), (64, 128), (3, 10, 64)])
def test_dequantize_equals_bnb(shape):
    w = _weight(shape, torch.float32, seed=shape[-1])
    for blocksize, double_quant in ((64, True), (32, False), (256, False), (4096, True)):
        packed, theirs = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
        _, state = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        for out_dtype in FLOATS:
            theirs.dtype = out_dtype
            expected = bnb_dequantize_4bit(packed, theirs)  # bnb's definition (see _bnb_reference)
            got = nf4.dequantize_nf4(packed, state, out_dtype)
            assert got.dtype == out_dtype and got.shape == torch.Size(shape)
            assert torch.equal(got, expected.reshape(got.shape)), (blocksize, out_dtype)
            if shape[-1] % blocksize == 0:  # bnb's native CPU kernel is exact here too
                native = bnb_f.dequantize_4bit(packed, theirs, quant_type="nf4")  # [1, n] for 1-D shapes
                assert torch.equal(got, native.reshape(got.shape)), (blocksize, out_dtype)


def test_dynamic_code_equals_bnb():
    assert torch.equal(nf4.dynamic_code_8bit(), bnb_f.create_dynamic_map())
    assert torch.equal(nf4.NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", FLOATS)
def test_blockwise_8bit_equals_bnb(dtype):
    x = _weight((3, 2000), dtype, seed=11)
    for blocksize in (64, 256, 4096):
        q_theirs, st = bnb_f.quantize_blockwise(x, blocksize=blocksize)
        q, absmax = nf4.quantize_blockwise_8bit(x, blocksize=blocksize)
        assert torch.equal(q, q_theirs) and torch.equal(absmax, st.absmax), blocksize
        for out_dtype in FLOATS:
            st.dtype = out_dtype
            expected = bnb_f.dequantize_blockwise(q_theirs, st)
            assert torch.equal(nf4.dequantize_blockwise_8bit(q, absmax, blocksize=blocksize, dtype=out_dtype), expected)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trips_with_bnb(double_quant, tmp_path):
    from bitsandbytes.functional import QuantState
    from safetensors.torch import load_file, save_file

    w = _weight((48, 96), torch.bfloat16, seed=2)
    packed, theirs = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours_packed, ours = nf4.quantize_nf4(w, blocksize=64, double_quant=double_quant)

    # same entries, same bytes
    theirs_dict = theirs.as_dict(packed=True)
    ours_dict = ours.to_bnb_dict()
    assert list(ours_dict) == list(theirs_dict)
    for key in theirs_dict:
        assert ours_dict[key].dtype == theirs_dict[key].dtype and torch.equal(ours_dict[key], theirs_dict[key]), key

    # bitsandbytes -> file -> npu-ft
    prefix = "model.layers.0.mlp.up_proj.weight."
    save_file({prefix[:-1]: packed, **{prefix + k: v for k, v in theirs_dict.items()}}, tmp_path / "bnb.safetensors")
    loaded = load_file(tmp_path / "bnb.safetensors")
    state = nf4.Nf4QuantState.from_bnb_dict(loaded, prefix=prefix)
    theirs.dtype = torch.bfloat16
    expected = bnb_dequantize_4bit(packed, theirs)  # 96 % 64: bnb's native CPU kernel is off here
    assert torch.equal(nf4.dequantize_nf4(loaded[prefix[:-1]], state), expected)

    # npu-ft -> file -> bitsandbytes
    save_file({prefix[:-1]: ours_packed, **ours.to_bnb_dict(prefix)}, tmp_path / "ours.safetensors")
    loaded = load_file(tmp_path / "ours.safetensors")
    qs = QuantState.from_dict({k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}, device="cpu")
    assert qs == theirs
    assert torch.equal(bnb_dequantize_4bit(loaded[prefix[:-1]], qs), expected)


def test_linear4bit_state_dict_loads():
    """The entries bitsandbytes' Linear4bit writes into a model state dict (what transformers saves)."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    w = _weight((32, 64), torch.float32, seed=3)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True)
    layer = layer.to("cpu")
    if getattr(layer.weight, "quant_state", None) is None:
        layer.weight = layer.weight._quantize("cpu")
    sd = layer.state_dict()
    state = nf4.Nf4QuantState.from_bnb_dict(sd, prefix="weight.")
    assert state.nested and state.shape == (32, 64)
    expected = bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state, quant_type="nf4")
    assert torch.equal(nf4.dequantize_nf4(sd["weight"], state), expected)
    packed, _ = nf4.quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(packed, sd["weight"])
