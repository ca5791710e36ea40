"""npu_ft::lora_linear against PEFT's lora.Linear, the cpu kernel against the reference, opcheck,
memory contract (what backward saves) and argument errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import npu_ft.ops  # noqa: F401  (registers the ops and the cpu kernels)
from npu_ft.modules import LoraLinear
from npu_ft.ops import _lora_fused as fused_lora
from npu_ft.ops import _registry
from npu_ft.ops.lora import (
    lora_linear,
    lora_linear_backward_reference,
    lora_linear_reference,
)

peft = pytest.importorskip("peft")



def _assert_close(actual, expected, dtype, msg=None, op="lora_linear"):
    """Within ``op``'s tolerance for ``dtype`` (the op registry's table, also read by npu-ft doctor)."""
    _registry.tolerance(op, dtype).assert_close(actual, expected, msg=msg)


class _Wrap(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _pair(in_f, out_f, r, *, alpha=16, dropout=0.0, rslora=False, bias=True, dtype=torch.float32,
          autocast=True, seed=0):
    """(PEFT lora.Linear, npu_ft LoraLinear) built from the same seed; B randomized identically."""
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(
        _Wrap(copy.deepcopy(base)),
        peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, target_modules=["proj"]),
        autocast_adapter_dtype=autocast,
    )
    ref = model.base_model.model.proj
    torch.manual_seed(seed + 1)
    mine = LoraLinear(copy.deepcopy(base), r, alpha, lora_dropout=dropout, use_rslora=rslora,
                      autocast_adapter_dtype=autocast)
    # same init as PEFT, bit for bit
    assert torch.equal(mine.lora_A.weight, ref.lora_A["default"].weight)
    assert mine.lora_A.weight.dtype == ref.lora_A["default"].weight.dtype
    assert mine.scaling == ref.scaling["default"]
    with torch.no_grad():
        torch.manual_seed(seed + 2)
        ref.lora_B["default"].weight.normal_()
        mine.lora_B.weight.copy_(ref.lora_B["default"].weight)
    if bias:  # train the bias too, to check dbias
        ref.base_layer.bias.requires_grad_(True)
        mine.base_layer.bias.requires_grad_(True)
    return ref, mine


def _run(layer, x, grad, seed):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(grad)
    grads = {"x": x.grad}
    for name, p in layer.named_parameters():
        if p.requires_grad:
            short = "A" if "lora_A" in name else "B" if "lora_B" in name else "bias" if "bias" in name else name
            grads[short] = p.grad
    return y.detach(), grads


CASES = [
    # in, out, r, batch dims
    (7, 5, 1, (5,)),
    (13, 11, 3, (2, 3)),
    (33, 17, 8, (2, 3, 4)),
    (64, 40, 8, (9,)),
]


def _compare(ref, mine, batch, in_f, out_f, dtype, seed=0, train=True):
    ref.train(train)
    mine.train(train)
    torch.manual_seed(100 + seed)
    x = torch.randn(*batch, in_f).to(dtype)
    grad = torch.randn(*batch, out_f).to(dtype)
    y_ref, g_ref = _run(ref, x, grad, seed=1234)
    y, g = _run(mine, x, grad, seed=1234)
    assert y.dtype == y_ref.dtype == dtype and y.shape == y_ref.shape
    _assert_close(y, y_ref, dtype)
    assert set(g) == set(g_ref), (set(g), set(g_ref))
    for k in g_ref:
        assert g[k].dtype == g_ref[k].dtype, k
        # grads of fp32 adapters in a bf16 model carry bf16 rounding from dy and x
        _assert_close(g[k], g_ref[k], dtype, msg=lambda m, k=k: f"grad {k}: {m}")
    return g


@pytest.mark.parametrize("in_f,out_f,r,batch", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_peft_fp32(in_f, out_f, r, batch, bias):
    ref, mine = _pair(in_f, out_f, r, bias=bias)
    g = _compare(ref, mine, batch, in_f, out_f, torch.float32)
    assert ("bias" in g) == bias
    assert mine.base_layer.weight.grad is None


@pytest.mark.parametrize("in_f,out_f,r,batch", CASES[1:3])
def test_matches_peft_rslora(in_f, out_f, r, batch):
    ref, mine = _pair(in_f, out_f, r, alpha=7, rslora=True)
    assert mine.scaling == pytest.approx(7 / r**0.5)
    _compare(ref, mine, batch, in_f, out_f, torch.float32)


@pytest.mark.parametrize("in_f,out_f,r,batch", CASES)
def test_matches_peft_dropout_same_seed(in_f, out_f, r, batch):
    ref, mine = _pair(in_f, out_f, r, dropout=0.1)
    _compare(ref, mine, batch, in_f, out_f, torch.float32)
    # eval mode: dropout off on both sides
    _compare(ref, mine, batch, in_f, out_f, torch.float32, train=False)


@pytest.mark.parametrize("in_f,out_f,r,batch", CASES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_matches_peft_bf16_base_fp32_adapters(in_f, out_f, r, batch, dropout):
    """PEFT's default for a bf16 model: adapters upcast to fp32, x cast to fp32 for the branch."""
    ref, mine = _pair(in_f, out_f, r, dropout=dropout, dtype=torch.bfloat16, autocast=True)
    assert mine.lora_A.weight.dtype == torch.float32
    g = _compare(ref, mine, batch, in_f, out_f, torch.bfloat16)
    assert g["A"].dtype == torch.float32 and g["x"].dtype == torch.bfloat16


@pytest.mark.parametrize("in_f,out_f,r,batch", CASES[:3])
def test_matches_peft_pure_bf16(in_f, out_f, r, batch):
    ref, mine = _pair(in_f, out_f, r, dtype=torch.bfloat16, autocast=False)
    assert mine.lora_A.weight.dtype == torch.bfloat16
    _compare(ref, mine, batch, in_f, out_f, torch.bfloat16)


def test_mixed_dtype_forward_rounding_is_peft_s():
    """bf16 x/W with fp32 A/B: bit-identical forward to PEFT (add in fp32, then round once)."""
    ref, mine = _pair(96, 80, 8, dtype=torch.bfloat16, autocast=True)
    x = torch.randn(6, 96).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(mine(x), ref(x))


# ---------------------------------------------------------------------------------------------
# cpu kernel vs reference
# ---------------------------------------------------------------------------------------------


def _random_args(batch, in_f, out_f, r, x_dtype, lora_dtype, bias, with_x_lora, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, in_f, generator=g).to(x_dtype)
    w = torch.randn(out_f, in_f, generator=g).to(x_dtype)
    b = torch.randn(out_f, generator=g).to(x_dtype) if bias else None
    a = torch.randn(r, in_f, generator=g).to(lora_dtype)
    bb = torch.randn(out_f, r, generator=g).to(lora_dtype)
    keep = (torch.rand(x.shape, generator=g) > 0.3).to(lora_dtype) / 0.7
    xl = x.to(lora_dtype) * keep if with_x_lora else None
    return x, w, b, a, bb, xl


KERNEL_CASES = [
    # batch, in, out, r, x dtype, lora dtype
    ((5,), 7, 5, 1, torch.float32, torch.float32),
    ((2, 3), 13, 11, 3, torch.float32, torch.float32),
    ((17,), 64, 33, 8, torch.bfloat16, torch.bfloat16),
    ((2, 5), 33, 48, 4, torch.bfloat16, torch.float32),
    ((4,), 16, 24, 2, torch.float32, torch.bfloat16),
]


@pytest.mark.parametrize("batch,in_f,out_f,r,xd,ld", KERNEL_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_x_lora", [False, True])
def test_cpu_kernel_matches_reference(batch, in_f, out_f, r, xd, ld, bias, with_x_lora):
    torch.manual_seed(0)
    x, w, b, a, bb, xl = _random_args(batch, in_f, out_f, r, xd, ld, bias, with_x_lora)
    scaling = 0.75
    tol_dtype = torch.bfloat16 if torch.bfloat16 in (xd, ld) else torch.float32
    y_ref, h_ref = lora_linear_reference(x, w, b, a, bb, scaling, xl)
    y, h = fused_lora.lora_linear_fused(x, w, b, a, bb, scaling, xl)
    assert y.dtype == y_ref.dtype == xd and h.dtype == h_ref.dtype == ld
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    _assert_close(y, y_ref, tol_dtype)
    _assert_close(h, h_ref, tol_dtype)
    grad = torch.randn_like(y_ref)
    for mask in ([True, with_x_lora, True, True, bias], [True, False, False, True, False],
                 [False, with_x_lora, True, False, bias]):
        ref = lora_linear_backward_reference(grad, x, w, a, bb, h_ref, scaling, xl, mask)
        out = fused_lora.lora_linear_backward_fused(grad, x, w, a, bb, h_ref, scaling, xl, mask)
        for i, (o, rr) in enumerate(zip(out, ref, strict=False)):
            assert o.dtype == rr.dtype and o.shape == rr.shape, (i, o.dtype, rr.dtype, o.shape, rr.shape)
            if rr.numel():
                _assert_close(o, rr, tol_dtype, op="lora_linear_backward")
        wanted = [mask[0], mask[1] and with_x_lora, mask[2], mask[3], mask[4]]
        assert [o.numel() > 0 for o in out] == wanted


def test_cpu_kernel_is_dispatched_and_reference_is_exact_peft_math():
    _registry.reset_kernel_calls()
    x, w, b, a, bb, _ = _random_args((3,), 8, 6, 2, torch.float32, torch.float32, True, False)
    y = lora_linear(x, w, b, a, bb, 2.0)
    assert _registry.kernel_calls("lora_linear") == {"cpu": 1}
    expected = x @ w.T + b + 2.0 * (x @ a.T) @ bb.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_autograd_through_caller_dropout():
    """With x_lora given, its gradient flows back through the caller's dropout into x."""
    x, w, b, a, bb, _ = _random_args((4,), 10, 6, 3, torch.float32, torch.float32, True, False)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    mask = (torch.rand(4, 10, generator=torch.Generator().manual_seed(3)) > 0.5).float() * 2.0
    y = lora_linear(x, w, b, a, bb, 0.5, x * mask)
    g = torch.randn_like(y)
    y.backward(g)
    expected_dx = g @ w + ((0.5 * g @ bb) @ a) * mask
    torch.testing.assert_close(x.grad, expected_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, (0.5 * g @ bb).T @ (x * mask).detach(), rtol=1e-5, atol=1e-5)


def test_backward_saves_no_weight_copy_and_no_full_output():
    tokens, in_f, out_f, r = 32, 24, 40, 4
    x, w, b, a, bb, _ = _random_args((tokens,), in_f, out_f, r, torch.float32, torch.float32, True, False)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, w, b, a, bb, 1.0)
    for t in saved:
        assert t.numel() != tokens * out_f, f"saved a full-size output {tuple(t.shape)}"
        if t.shape == w.shape:
            assert t.data_ptr() == w.data_ptr(), "saved a copy of the frozen weight"
    y.sum().backward()
    assert w.grad is None


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bias,with_x_lora,dtypes",
    [
        (True, True, (torch.float32, torch.float32)),
        (False, False, (torch.float32, torch.float32)),
        (True, False, (torch.bfloat16, torch.float32)),
    ],
)
def test_opcheck_lora_linear(bias, with_x_lora, dtypes):
    x, w, b, a, bb, xl = _random_args((2, 3), 12, 10, 4, dtypes[0], dtypes[1], bias, with_x_lora)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    if xl is not None:
        xl.requires_grad_(True)
    torch.library.opcheck(torch.ops.npu_ft.lora_linear.default, (x, w, b, a, bb, 0.5, xl))


@pytest.mark.parametrize(
    "with_x_lora,mask", [(True, [True, True, True, True, True]), (False, [False, False, True, True, False])]
)
def test_opcheck_lora_linear_backward(with_x_lora, mask):
    x, w, b, a, bb, xl = _random_args((7,), 12, 10, 4, torch.float32, torch.float32, True, with_x_lora)
    _, h = lora_linear_reference(x, w, b, a, bb, 0.5, xl)
    grad = torch.randn(7, 10)
    torch.library.opcheck(torch.ops.npu_ft.lora_linear_backward.default, (grad, x, w, a, bb, h, 0.5, xl, mask))


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------


def _good():
    x, w, b, a, bb, _ = _random_args((3,), 8, 6, 2, torch.float32, torch.float32, True, False)
    return dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scaling=1.0, x_lora=None)


BAD = [
    ("x", lambda k: k["x"].to(torch.int64), TypeError),
    ("x", lambda k: "not a tensor", TypeError),
    ("x", lambda k: torch.randn(3, 9), ValueError),  # in-features mismatch
    ("weight", lambda k: k["weight"].double(), TypeError),
    ("weight", lambda k: torch.randn(6, 8, 1), ValueError),
    ("bias", lambda k: torch.randn(5), ValueError),
    ("bias", lambda k: k["bias"].to(torch.bfloat16), TypeError),
    ("lora_A", lambda k: torch.randn(2, 9), ValueError),  # in mismatch
    ("lora_A", lambda k: torch.randn(0, 8), ValueError),  # rank 0
    ("lora_A", lambda k: k["lora_A"].to(torch.int32), TypeError),
    ("lora_A", lambda k: k["lora_A"].to("meta"), ValueError),  # device mismatch
    ("lora_B", lambda k: torch.randn(6, 3), ValueError),  # rank mismatch
    ("lora_B", lambda k: torch.randn(5, 2), ValueError),  # out mismatch
    ("lora_B", lambda k: k["lora_B"].to(torch.bfloat16), TypeError),  # dtype differs from A
    ("x_lora", lambda k: torch.randn(4, 8), ValueError),
    ("x_lora", lambda k: torch.randn(3, 8).to(torch.bfloat16), TypeError),
    ("scaling", lambda k: float("nan"), ValueError),
    ("scaling", lambda k: float("inf"), ValueError),
    ("scaling", lambda k: "2", TypeError),
    ("scaling", lambda k: torch.tensor(2.0), TypeError),
]


@pytest.mark.parametrize("name,make,exc", BAD)
def test_bad_inputs_name_the_argument(name, make, exc):
    kwargs = _good()
    kwargs[name] = make(kwargs)
    _registry.reset_kernel_calls()
    with pytest.raises(exc, match=rf"^{name}"):
        lora_linear(**kwargs)
    assert _registry.kernel_calls("lora_linear") == {}


def test_weight_requiring_grad_is_refused():
    kwargs = _good()
    kwargs["weight"].requires_grad_(True)
    with pytest.raises(ValueError, match=r"^weight: .*frozen"):
        lora_linear(**kwargs)
    with torch.no_grad():  # fine without grad mode
        lora_linear(**kwargs)


@pytest.mark.parametrize("kind", ["1d", "empty", "noncontiguous"])
def test_edge_shapes_forward_and_backward(kind):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    a = torch.randn(3, 8, generator=g).requires_grad_(True)
    bb = torch.randn(6, 3, generator=g).requires_grad_(True)
    if kind == "1d":
        x = torch.randn(8, generator=g)
    elif kind == "empty":
        x = torch.randn(0, 8)
    else:
        x = torch.randn(8, 5, generator=g).t()  # [5, 8], strided
    x.requires_grad_(True)
    y = lora_linear(x, w, b, a, bb, 0.5)
    expected = torch.nn.functional.linear(x, w, b) + 0.5 * (x @ a.T) @ bb.T
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.sum(), (x, a, bb))
    grads_ref = torch.autograd.grad(expected.sum(), (x, a, bb))
    for got, ref in zip(grads, grads_ref, strict=False):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
