"""npu kernels of the LoRA-family ops (``npu_ft/ops/backends/npu/methods.py``) on an npu device: the
test suite's fake npu (host memory, see tests/fake_npu), or a real Ascend NPU under the ``ascend``
marker. Proves that npu tensors reach the npu kernels (never the reference), that results and
gradients match the reference run on the CPU, and that dtypes and devices flow through autograd.
Tolerances: those of ``_methods_helpers``."""

from __future__ import annotations

import pytest
import torch

from npu_ft.ops import _registry, kernel_calls, reset_kernel_calls
from npu_ft.ops import dora as D
from npu_ft.ops import lora as L
from npu_ft.ops import lora_fa as FA
from tests.fake_npu.fixtures import fake_npu  # noqa: F401  (module-scoped fixture)

from ._methods_helpers import close, method_args, nf4_args, saved_z, tol_dtype
from .test_npu_backend import npu  # noqa: F401  (the fake npu, or a real one under the ascend marker)

OPS = ("dora_weight_norm", "dora_linear", "dora_linear_backward", "dora_nf4_linear", "dora_nf4_linear_backward",
       "lora_fa_linear", "lora_fa_linear_backward", "lora_fa_nf4_linear", "lora_fa_nf4_linear_backward")
PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]


def _only_npu(*ops):
    for op in ops:
        seen = kernel_calls(op)
        assert seen.get("npu", 0) >= 1 and seen.get("reference", 0) == 0, f"{op}: {seen}"


def _leaves(a, names, device):
    return {n: (a[n].detach().to(device).requires_grad_(True) if a[n] is not None else None) for n in names}


def _compare(fn_npu, fn_cpu, a, names, npu, td):
    """Run ``fn(**leaves)`` forward + backward on the CPU (reference kernels) and on the npu."""
    results = []
    for device, fn in (("cpu", fn_cpu), (npu, fn_npu)):
        leaves = _leaves(a, names, device)
        y = fn(**leaves)
        y.backward(a["grad"].to(device))
        results.append((y, leaves))
    (y_ref, ref), (y, got) = results
    assert y.device.type == "npu" and y.dtype == y_ref.dtype
    close(y.detach().cpu(), y_ref.detach(), td, "y")
    for n in names:
        if ref[n] is not None:
            assert got[n].grad.device.type == "npu" and got[n].grad.dtype == got[n].dtype, n
            close(got[n].grad.cpu(), ref[n].grad, td, f"d{n}")


def test_npu_kernels_are_registered(npu):
    for op in OPS:
        assert "npu" in _registry.REGISTERED[op], f"{op} has no npu kernel"


def _reference_grads(a, weight_args, forward_ref, backward_ref, frozen_a):
    """Reference forward + its backward op on the CPU: {name: tensor} like the npu side's."""
    fwd = (a["x"], *weight_args, a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], a["weight_sq_norm"], 0.5,
           a["x_lora"])
    out = forward_ref(*fwd)
    y, h, _, norm = out
    dropout = a["x_lora"] is not None
    mask = [True, dropout, not frozen_a, True, True, a["bias"] is not None]
    grads = backward_ref(a["grad"], a["x"], *weight_args, a["lora_A"], a["lora_B"], a["magnitude"], h,
                         saved_z(out)[0], norm, 0.5, a["x_lora"], dropout, saved_z(out)[1], mask)
    names = ("x", "x_lora", "lora_A", "lora_B", "magnitude", "bias")
    return {"y": y, **{n: g for n, g, asked in zip(names, grads, mask, strict=True) if asked}}


def _npu_grads(a, npu, call, frozen_a):
    leaves = {n: a[n].detach().to(npu) for n in ("x", "x_lora", "lora_A", "lora_B", "magnitude", "bias")
              if a[n] is not None}
    for n, t in leaves.items():
        if not (frozen_a and n == "lora_A"):
            t.requires_grad_(True)
    y = call(leaves)
    y.backward(a["grad"].to(npu))
    assert y.device.type == "npu"
    return {"y": y.detach(), **{n: t.grad for n, t in leaves.items() if t.grad is not None}}


def _compare_dicts(got, want, td):
    assert set(got) == set(want), (set(got), set(want))
    for n in want:
        assert got[n].device.type == "npu", n
        close(got[n].cpu(), want[n], td, n)


@pytest.mark.parametrize("xd,ld", PAIRS)
@pytest.mark.parametrize("dropout", [False, True])
def test_dora_linear(npu, xd, ld, dropout):
    a = method_args((3, 7), 33, 17, 4, xd, ld, dropout=dropout)
    want = _reference_grads(a, (a["weight"],), D.dora_linear_reference, D.dora_linear_backward_reference, False)
    reset_kernel_calls()
    got = _npu_grads(a, npu, lambda t: D.dora_linear(t["x"], a["weight"].to(npu), t["bias"], t["lora_A"], t["lora_B"],
                                                     t["magnitude"], a["weight_sq_norm"].to(npu), 0.5,
                                                     t.get("x_lora")), False)
    _only_npu("dora_linear", "dora_linear_backward", "dora_weight_norm")
    _compare_dicts(got, want, tol_dtype(xd, ld))


@pytest.mark.parametrize("xd", [torch.float32, torch.bfloat16])
def test_dora_nf4_linear_with_frozen_a(npu, xd):
    a = method_args((2, 5), 64, 24, 4, xd, torch.float32, bias=False)
    packed, state, _ = nf4_args(a)
    nf4 = (packed, state.absmax_fp32(), state.blocksize, list(state.shape))
    want = _reference_grads(a, nf4, D.dora_nf4_linear_reference, D.dora_nf4_linear_backward_reference, True)
    reset_kernel_calls()
    got = _npu_grads(a, npu, lambda t: D.dora_nf4_linear(t["x"], packed.to(npu), state.to(npu), t.get("bias"),
                                                         t["lora_A"], t["lora_B"], t["magnitude"],
                                                         a["weight_sq_norm"].to(npu), 0.5), True)
    _only_npu("dora_nf4_linear", "dora_nf4_linear_backward", "nf4_dequantize")
    _compare_dicts(got, want, tol_dtype(xd, torch.float32))


@pytest.mark.parametrize("xd,ld", PAIRS)
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_fa_linear(npu, xd, ld, dropout):
    a = method_args((3, 7), 33, 17, 4, xd, ld, dropout=dropout)
    A, W = a["lora_A"], a["weight"]

    def fn_npu(x, bias, lora_B, x_lora=None):
        return FA.lora_fa_linear(x, W.to(npu), bias, A.to(npu), lora_B, 0.8, x_lora)

    def fn_cpu(x, bias, lora_B, x_lora=None):  # LoRA-FA's math is LoRA's: the reference differentiated
        return L.lora_linear_reference(x, W, bias, A, lora_B, 0.8, x_lora)[0]

    reset_kernel_calls()
    names = ["x", "bias", "lora_B"] + (["x_lora"] if dropout else [])
    _compare(fn_npu, fn_cpu, a, names, npu, tol_dtype(xd, ld))
    _only_npu("lora_fa_linear", "lora_fa_linear_backward")


def test_lora_fa_nf4_linear(npu):
    a = method_args((9,), 64, 40, 4, torch.bfloat16, torch.float32, dropout=True)
    packed, state, _ = nf4_args(a)
    absmax, shape, A = state.absmax_fp32(), list(state.shape), a["lora_A"]

    def fn_npu(x, bias, lora_B, x_lora):
        return FA.lora_fa_nf4_linear(x, packed.to(npu), state.to(npu), bias, A.to(npu), lora_B, 0.8, x_lora)

    def fn_cpu(x, bias, lora_B, x_lora):
        return L.nf4_linear_reference(x, packed, absmax, 64, shape, bias, A, lora_B, 0.8, x_lora)[0]

    reset_kernel_calls()
    _compare(fn_npu, fn_cpu, a, ["x", "bias", "lora_B", "x_lora"], npu, torch.bfloat16)
    _only_npu("lora_fa_nf4_linear", "lora_fa_nf4_linear_backward")


def test_doctor_rows_pass_on_the_npu_kernels(npu):
    from npu_ft import doctor
    from npu_ft.ops import dora, lora_fa

    results = [doctor.run_check(doctor.Check(**c), npu) for c in dora.doctor_checks() + lora_fa.doctor_checks()]
    assert len(results) == 8
    for r in results:
        assert r.passed and r.kernel == "npu", r
