"""npu_ft::nf4_linear (QLoRA base + fused LoRA): against dequantize-then-LoRA in plain torch, against
bitsandbytes' own dequantization, against PEFT's lora.Linear4bit over bnb.nn.Linear4bit (runs on
CPU with bitsandbytes 0.50), cpu kernel vs reference, opcheck, memory contract, argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import npu_ft.ops  # noqa: F401
from npu_ft.modules import LoraLinear, Nf4Linear
from npu_ft.ops import _lora_fused as fused_lora
from npu_ft.ops import _registry
from npu_ft.ops.lora import nf4_linear, nf4_linear_backward_reference, nf4_linear_reference
from npu_ft.ops.nf4 import Nf4QuantState, dequantize_nf4, quantize_nf4

from ._bnb_reference import bnb_dequantize_4bit


def _close(actual, expected, dtype, msg=None, op="nf4_linear"):
    """Within ``op``'s tolerance for ``dtype`` (the op registry's table, also read by npu-ft doctor)."""
    _registry.tolerance(op, dtype).assert_close(actual, expected, msg=msg)


def _setup(out_f, in_f, r, batch, dtype, lora_dtype, bias=True, double_quant=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.1
    packed, state = quantize_nf4(w.to(dtype), blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(*batch, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, in_f, generator=g) * 0.2).to(lora_dtype) if r else None
    bb = (torch.randn(out_f, r, generator=g) * 0.2).to(lora_dtype) if r else None
    return packed, state, x, b, a, bb


def _plain_reference(x, w, b, a, bb, scaling, x_lora):
    """PEFT Linear4bit math on a dense W: branch rounded to y's dtype, then added."""
    y = F.linear(x, w, b)
    if a is None:
        return y
    xl = x.to(a.dtype) if x_lora is None else x_lora
    return y + (F.linear(F.linear(xl, a), bb) * scaling).to(y.dtype)


CASES = [
    # out, in, r, batch, x dtype, lora dtype, blocksize, double quant
    (5, 7, 1, (5,), torch.float32, torch.float32, 64, True),  # numel 35: odd, one partial block
    (11, 13, 3, (2, 3), torch.float32, torch.float32, 64, False),
    (40, 33, 8, (2, 3, 4), torch.bfloat16, torch.float32, 64, True),
    (24, 64, 4, (9,), torch.bfloat16, torch.bfloat16, 128, True),
    (17, 32, 0, (3,), torch.float32, torch.float32, 64, True),  # no LoRA: plain QLoRA base
]


@pytest.mark.parametrize("out_f,in_f,r,batch,dtype,ldtype,blocksize,dq", CASES)
@pytest.mark.parametrize("dropout", [False, True])
def test_matches_dequantize_then_lora(out_f, in_f, r, batch, dtype, ldtype, blocksize, dq, dropout):
    if dropout and not r:
        pytest.skip("dropout only applies to the LoRA branch")
    packed, state, x, b, a, bb = _setup(out_f, in_f, r, batch, dtype, ldtype, blocksize=blocksize, double_quant=dq)
    w = dequantize_nf4(packed, state, dtype)
    scaling = 1.5
    leaves = {"x": x, "b": b, "a": a, "bb": bb}
    runs = []
    for fn in ("op", "plain"):
        t = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in leaves.items()}
        xl = None
        if dropout:
            torch.manual_seed(7)
            xl = F.dropout(t["x"].to(ldtype), 0.25, training=True)
        if fn == "op":
            y = nf4_linear(t["x"], packed, state, t["b"], t["a"], t["bb"], scaling, xl)
        else:
            y = _plain_reference(t["x"], w, t["b"], t["a"], t["bb"], scaling, xl)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        y.backward(g)
        runs.append((y.detach(), {k: v.grad for k, v in t.items() if v is not None}))
    (y, grads), (y_ref, grads_ref) = runs
    assert y.dtype == dtype and y.shape == (*batch, out_f)
    _close(y, y_ref, dtype)
    for k in grads_ref:
        assert grads[k] is not None and grads[k].dtype == grads_ref[k].dtype, k
        _close(grads[k], grads_ref[k], dtype, msg=lambda m, k=k: f"grad {k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_weight_matches_bitsandbytes(dtype):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state, x, b, _, _ = _setup(48, 80, 0, (6,), dtype, dtype)
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0)) * 0.1
    q, qs = bnbf.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q, packed)  # same storage bytes
    w_bnb = bnb_dequantize_4bit(q, qs).to(dtype)  # bnb's definition: 80 % 64, see _bnb_reference
    y = nf4_linear(x, packed, state, b)
    torch.testing.assert_close(y, F.linear(x, w_bnb, b), rtol=0, atol=0 if dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------------------------------------
# against PEFT's lora.Linear4bit over bnb.nn.Linear4bit (CPU works with bitsandbytes 0.50)
# ---------------------------------------------------------------------------------------------


class _Wrap(nn.Module):
    is_loaded_in_4bit = True  # what transformers sets; makes PEFT pick lora.Linear4bit

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.1)])
def test_matches_peft_linear4bit(dtype, dropout):
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    torch.manual_seed(0)
    # in_features a multiple of the blocksize: bnb's native CPU kernel is wrong when blocks span rows
    lin = nn.Linear(128, 80).to(dtype)
    q = bnb.nn.Linear4bit(128, 80, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                 compress_statistics=True)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")  # quantizes
    torch.manual_seed(1)
    model = peft.get_peft_model(_Wrap(q), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                         target_modules=["proj"]))
    ref = model.base_model.model.proj
    assert isinstance(ref, PeftLinear4bit)
    torch.manual_seed(1)
    mine = LoraLinear(Nf4Linear.from_linear(lin, compute_dtype=dtype), 4, 8, lora_dropout=dropout)
    assert torch.equal(mine.base_layer.packed, q.weight.data)
    assert torch.equal(mine.lora_A.weight, ref.lora_A["default"].weight)
    assert mine.lora_A.weight.dtype == ref.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        ref.lora_B["default"].weight.normal_()
        mine.lora_B.weight.copy_(ref.lora_B["default"].weight)
    x = torch.randn(2, 5, 128).to(dtype)
    g = torch.randn(2, 5, 80).to(dtype)
    out = []
    for layer, lora_A, lora_B in ((ref, ref.lora_A["default"], ref.lora_B["default"]),
                                  (mine, mine.lora_A, mine.lora_B)):
        layer.train()
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        y = layer(xx)
        y.backward(g)
        out.append((y.detach(), xx.grad, lora_A.weight.grad, lora_B.weight.grad))
    for name, a, r in zip(("y", "dx", "dA", "dB"), out[1], out[0], strict=False):
        assert a.dtype == r.dtype, name
        _close(a, r, dtype, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# cpu kernel vs reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_f,in_f,r,batch,dtype,ldtype,blocksize,dq", CASES)
@pytest.mark.parametrize("with_x_lora", [False, True])
def test_cpu_kernel_matches_reference(out_f, in_f, r, batch, dtype, ldtype, blocksize, dq, with_x_lora):
    if with_x_lora and not r:
        pytest.skip("x_lora only with LoRA")
    packed, state, x, b, a, bb = _setup(out_f, in_f, r, batch, dtype, ldtype, blocksize=blocksize, double_quant=dq)
    absmax, shape = state.absmax_fp32(), list(state.shape)
    xl = x.to(ldtype) * 2.0 if with_x_lora else None
    args = (x, packed, absmax, state.blocksize, shape, b, a, bb, 0.5, xl)
    y_ref, h_ref = nf4_linear_reference(*args)
    y, h = fused_lora.nf4_linear_fused(*args)
    assert y.dtype == y_ref.dtype and h.shape == h_ref.shape and h.dtype == h_ref.dtype
    _close(y, y_ref, dtype)
    if r:
        _close(h, h_ref, ldtype)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for mask in ([True, with_x_lora, bool(r), bool(r), True], [True, False, False, False, False],
                 [False, with_x_lora, bool(r), bool(r), False]):
        bargs = (grad, x, packed, absmax, state.blocksize, shape, a, bb, h_ref, 0.5, xl, mask)
        ref = nf4_linear_backward_reference(*bargs)
        out = fused_lora.nf4_linear_backward_fused(*bargs)
        for i, (o, rr) in enumerate(zip(out, ref, strict=False)):
            assert o.shape == rr.shape and o.dtype == rr.dtype, i
            if rr.numel():
                _close(o, rr, dtype if i in (0, 4) else ldtype, op="nf4_linear_backward")


# ---------------------------------------------------------------------------------------------
# opcheck, memory, kernel dispatch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r,with_x_lora,dtype", [(4, True, torch.float32), (0, False, torch.float32),
                                                (3, False, torch.bfloat16)])
def test_opcheck_nf4_linear(r, with_x_lora, dtype):
    packed, state, x, b, a, bb = _setup(10, 12, r, (2, 3), dtype, torch.float32)
    for t in (x, b, a, bb):
        if t is not None:
            t.requires_grad_(True)
    xl = (x.detach().to(torch.float32) * 2).requires_grad_(True) if with_x_lora else None
    args = (x, packed, state.absmax_fp32(), state.blocksize, list(state.shape), b, a, bb, 0.5, xl)
    torch.library.opcheck(torch.ops.npu_ft.nf4_linear.default, args)


def test_opcheck_nf4_linear_backward():
    packed, state, x, b, a, bb = _setup(10, 12, 4, (7,), torch.float32, torch.float32)
    absmax, shape = state.absmax_fp32(), list(state.shape)
    _, h = nf4_linear_reference(x, packed, absmax, 64, shape, b, a, bb, 0.5, None)
    grad = torch.randn(7, 10)
    torch.library.opcheck(torch.ops.npu_ft.nf4_linear_backward.default,
                          (grad, x, packed, absmax, 64, shape, a, bb, h, 0.5, None, [True, False, True, True, True]))


def test_backward_redequantizes_instead_of_saving_w():
    packed, state, x, b, a, bb = _setup(40, 24, 4, (32,), torch.float32, torch.float32)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = nf4_linear(x, packed, state, b, a, bb, 2.0)
    assert not any(t.shape == (40, 24) for t in saved), "dense W saved for backward"
    assert not any(t.numel() == 32 * 40 for t in saved), "full-size output saved for backward"
    assert any(t is packed or t.data_ptr() == packed.data_ptr() for t in saved)
    _registry.reset_kernel_calls()
    y.sum().backward()
    assert _registry.kernel_calls("nf4_linear_backward") == {"cpu": 1}
    assert _registry.kernel_calls("nf4_dequantize")  # W rebuilt in backward
    assert x.grad is not None and a.grad is not None and bb.grad is not None


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------


def _good():
    packed, state, x, b, a, bb = _setup(6, 8, 2, (3,), torch.float32, torch.float32)
    return dict(x=x, packed=packed, state=state, bias=b, lora_A=a, lora_B=bb, scaling=1.0, x_lora=None)


BAD = [
    ("x", lambda k: k["x"].to(torch.int32), TypeError),
    ("x", lambda k: torch.randn(3, 9), ValueError),
    ("packed", lambda k: k["packed"].to(torch.int8), TypeError),
    ("packed", lambda k: k["packed"][:-1], ValueError),
    ("state", lambda k: {"shape": (6, 8)}, TypeError),
    ("bias", lambda k: torch.randn(7), ValueError),
    ("lora_A", lambda k: torch.randn(2, 9), ValueError),
    ("lora_A", lambda k: torch.randn(0, 8), ValueError),
    ("lora_B", lambda k: torch.randn(6, 3), ValueError),
    ("lora_B", lambda k: None, ValueError),  # A without B
    ("scaling", lambda k: float("nan"), ValueError),
]


@pytest.mark.parametrize("name,make,exc", BAD)
def test_bad_inputs_name_the_argument(name, make, exc):
    kwargs = _good()
    kwargs[name] = make(kwargs)
    _registry.reset_kernel_calls()
    with pytest.raises(exc, match=rf"^{name}"):
        nf4_linear(**kwargs)
    assert _registry.kernel_calls("nf4_linear") == {}


def test_x_lora_without_lora_is_refused():
    kwargs = _good()
    kwargs.update(lora_A=None, lora_B=None, x_lora=kwargs["x"].clone())
    with pytest.raises(ValueError, match=r"^x_lora"):
        nf4_linear(**kwargs)


def test_state_must_be_2d():
    w = torch.randn(2, 3, 4)
    packed, state = quantize_nf4(w)
    assert isinstance(state, Nf4QuantState)
    with pytest.raises(ValueError, match=r"^state"):
        nf4_linear(torch.randn(5, 4), packed, state)
