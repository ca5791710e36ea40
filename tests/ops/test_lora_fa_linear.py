"""LoRA-FA (frozen lora_A): ``LoraLinear(lora_fa=True)`` against PEFT's LoRA with ``lora_A`` frozen,
against our own non-FA LoRA (same outputs and dB), the cpu kernels against the references, opcheck,
the memory contract (backward keeps h [T, r], not x [T, in]) and argument errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import npu_ft.ops  # noqa: F401
from npu_ft.modules import LoraLinear, Nf4Linear
from npu_ft.ops import _registry
from npu_ft.ops import lora as L
from npu_ft.ops import lora_fa as FA
from npu_ft.ops.backends import _fused_methods as F

from ._methods_helpers import DTYPE_PAIRS, SHAPES, close, method_args, nf4_args, tol_dtype
from .test_modules import _Wrap

peft = pytest.importorskip("peft")


def _run(layer, x, gy, seed=5):
    layer.train()
    xx = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(xx)
    y.backward(gy)
    grads = {n.replace(".default", ""): p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return {"y": y.detach(), "x": xx.grad, **grads}


@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.1)])
def test_matches_peft_lora_with_frozen_a(dtype, dropout):
    torch.manual_seed(0)
    base = nn.Linear(40, 24).to(dtype)
    torch.manual_seed(1)
    model = peft.get_peft_model(_Wrap(copy.deepcopy(base)), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                           target_modules=["proj"]))
    ref = model.base_model.model.proj
    ref.lora_A["default"].weight.requires_grad_(False)
    torch.manual_seed(1)
    mine = LoraLinear(copy.deepcopy(base), 4, 8, lora_dropout=dropout, lora_fa=True)
    assert torch.equal(mine.lora_A.weight, ref.lora_A["default"].weight)
    with torch.no_grad():
        ref.lora_B["default"].weight.normal_()
        mine.lora_B.weight.copy_(ref.lora_B["default"].weight)
    x, gy = torch.randn(3, 5, 40).to(dtype), torch.randn(3, 5, 24).to(dtype)
    _registry.reset_kernel_calls()
    got, want = _run(mine, x, gy), _run(ref, x, gy)
    assert _registry.kernel_calls("lora_fa_linear") == {"cpu": 1}
    assert set(got) == set(want) == {"y", "x", "lora_B.weight"}
    for k in want:
        close(got[k], want[k], dtype, k, rel=1e-5 if dtype == torch.float32 else 2e-2)


def test_nf4_base_matches_lora_with_a_trained_too():
    """Same forward and dB as the QLoRA op (which also computes dA); no x saved."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    fa = LoraLinear(Nf4Linear.from_linear(lin), 4, 8, lora_fa=True)
    plain = copy.deepcopy(fa)
    plain.lora_A.weight.requires_grad_(True)
    with torch.no_grad():
        fa.lora_B.weight.normal_()
        plain.lora_B.weight.copy_(fa.lora_B.weight)
    x, gy = torch.randn(7, 64), torch.randn(7, 48)
    _registry.reset_kernel_calls()
    got, want = _run(fa, x, gy), _run(plain, x, gy)
    assert _registry.kernel_calls("lora_fa_nf4_linear") == {"cpu": 1}
    for k in ("y", "x", "lora_B.weight"):
        close(got[k], want[k], torch.float32, k, rel=1e-6)


@pytest.mark.parametrize("nf4", [False, True])
def test_backward_keeps_h_not_x(nf4):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    layer = LoraLinear(Nf4Linear.from_linear(lin) if nf4 else lin, 4, 8, lora_fa=True)
    x = torch.randn(11, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert any(t.shape == (11, 4) for t in saved)  # h
    assert not any(t.numel() % 64 == 0 and t.shape[0] == 11 for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None and layer.lora_B.weight.grad is not None and layer.lora_A.weight.grad is None


# ---------------------------------------------------------------------------------------------
# cpu kernels vs reference
# ---------------------------------------------------------------------------------------------

MASKS = [[True, True, True, True], [True, False, True, False], [False, True, False, True]]


def _check_backward(bwd, bwd_ref, head, a, h, td, dropout):
    for mask in MASKS:
        mask = [mask[0], mask[1] and dropout, mask[2], mask[3]]
        args = (a["grad"], *head, a["lora_A"], a["lora_B"], h, 0.75, dropout, mask)
        for name, o, rr, asked in zip(("dx", "dx_lora", "dB", "dbias"), bwd(*args), bwd_ref(*args), mask,
                                      strict=True):
            assert (o.numel() > 0) == asked, name
            close(o, rr, td, name)


@pytest.mark.parametrize("lead,in_f,out_f,r", SHAPES)
@pytest.mark.parametrize("xd,ld", DTYPE_PAIRS)
@pytest.mark.parametrize("dropout", [False, True])
def test_cpu_kernels_match_reference(lead, in_f, out_f, r, xd, ld, dropout):
    a = method_args(lead, in_f, out_f, r, xd, ld, dropout=dropout)
    fwd = (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.75, a["x_lora"])
    td = tol_dtype(xd, ld)
    (y, h), (y_ref, h_ref) = F.lora_fa_linear_fused(*fwd), L.lora_linear_reference(*fwd)
    close(y, y_ref, td, "y")
    close(h, h_ref, td, "h")
    _check_backward(F.lora_fa_linear_backward_fused, FA.lora_fa_linear_backward_reference, (a["weight"],), a, h_ref,
                    td, dropout)


@pytest.mark.parametrize("lead,in_f,out_f,r", SHAPES[1:])
@pytest.mark.parametrize("xd,ld", DTYPE_PAIRS[:2])
def test_cpu_nf4_kernels_match_reference(lead, in_f, out_f, r, xd, ld):
    a = method_args(lead, in_f, out_f, r, xd, ld, dropout=True)
    packed, state, _ = nf4_args(a)
    nf4 = (packed, state.absmax_fp32(), state.blocksize, list(state.shape))
    fwd = (a["x"], *nf4, a["bias"], a["lora_A"], a["lora_B"], 0.75, a["x_lora"])
    td = tol_dtype(xd, ld)
    (y, _), (y_ref, h_ref) = F.lora_fa_nf4_linear_fused(*fwd), L.nf4_linear_reference(*fwd)
    close(y, y_ref, td, "y")
    _check_backward(F.lora_fa_nf4_linear_backward_fused, FA.lora_fa_nf4_linear_backward_reference, nf4, a, h_ref, td,
                    True)


@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck(dropout):
    a = method_args((2, 3), 64, 10, 4, torch.float32, torch.float32, dropout=dropout)
    packed, state, _ = nf4_args(a)
    nf4 = (packed, state.absmax_fp32(), state.blocksize, list(state.shape))
    _, h = L.lora_linear_reference(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.5, a["x_lora"])
    mask = [True, dropout, True, True]
    torch.library.opcheck(torch.ops.npu_ft.lora_fa_linear_backward.default,
                          (a["grad"], a["weight"], a["lora_A"], a["lora_B"], h, 0.5, dropout, mask))
    torch.library.opcheck(torch.ops.npu_ft.lora_fa_nf4_linear_backward.default,
                          (a["grad"], *nf4, a["lora_A"], a["lora_B"], h, 0.5, dropout, mask))
    for name in ("x", "bias", "lora_B", "x_lora"):
        if a[name] is not None:
            a[name].requires_grad_(True)
    torch.library.opcheck(torch.ops.npu_ft.lora_fa_linear.default,
                          (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.5, a["x_lora"]))
    torch.library.opcheck(torch.ops.npu_ft.lora_fa_nf4_linear.default,
                          (a["x"], *nf4, a["bias"], a["lora_A"], a["lora_B"], 0.5, a["x_lora"]))


def test_trainable_a_is_refused_with_its_name():
    a = method_args((4,), 12, 10, 2, torch.float32, torch.float32)
    a["lora_A"].requires_grad_(True)
    with pytest.raises(ValueError, match=r"^lora_A: LoRA-FA keeps lora_A frozen"):
        FA.lora_fa_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.5)
    with torch.no_grad():  # fine without grad mode
        FA.lora_fa_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.5)
    with pytest.raises(ValueError, match=r"^lora_B"):
        FA.lora_fa_linear(a["x"], a["weight"], a["bias"], a["lora_A"].detach(), torch.randn(9, 2), 0.5)
