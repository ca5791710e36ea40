"""What ``lora_linear`` / ``nf4_linear`` keep of their input for backward.

The input ``x`` [..., in] is kept only where lora_A's gradient reads it (dA = dh^T x, no dropout). An
NF4 linear without an adapter (QLoRA with a partial lora_target), a linear with LoRA dropout (dA reads
x_lora) and one whose A is frozen keep a one-element stand-in with x's shape and dtype instead.

Checked two ways: through autograd (what is saved, and gradients equal to the oracle's, exactly for the
same kernel) and per backward kernel (reference = npu's, cpu, cuda's Triton under the interpreter):
with a NaN stand-in for x, each gives the same results as with x itself, so none reads x's data there.
Shapes are awkward (odd features, 3-d batch); fp32 (1e-5) and bf16 (2e-2) against the oracle.
"""

from __future__ import annotations

import pytest
import torch

import npu_ft.ops  # noqa: F401
from npu_ft.ops import _lora_fused
from npu_ft.ops.backends.cpu import lora as cpu_lora
from npu_ft.ops.lora import lora_linear, lora_linear_reference, nf4_linear, nf4_linear_reference
from npu_ft.ops.nf4 import quantize_nf4

IN, OUT, R = 37, 29, 5
DTYPES = [torch.float32, torch.bfloat16]


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, IN, generator=g).to(dtype)
    w = (torch.randn(OUT, IN, generator=g) * 0.1).to(dtype)
    a = (torch.randn(R, IN, generator=g) * 0.2).to(dtype)
    b = (torch.randn(OUT, R, generator=g) * 0.2).to(dtype)
    bias = torch.randn(OUT, generator=g).to(dtype)
    return x, w, a, b, bias


def _tolerance(dtype):
    """fp32: kernel vs oracle differ in summation order only; bf16: one rounding more or less, O(1) values."""
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _saved_during(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def _keeps_a_copy_of(saved, x):
    """Whether a saved tensor holds x-sized data (a stand-in's storage is one element)."""
    return any(t.untyped_storage().nbytes() >= x.numel() * x.element_size() and t.shape == x.shape for t in saved)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_linear_without_an_adapter_keeps_no_input(dtype):
    x, w, *_, bias = _tensors(dtype)
    packed, state = quantize_nf4(w, blocksize=64)
    x.requires_grad_(True)
    y, saved = _saved_during(lambda: nf4_linear(x, packed, state, bias))
    assert not _keeps_a_copy_of(saved, x)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    xr = x.detach().clone().requires_grad_(True)
    absmax, shape = state.absmax_fp32(), list(state.shape)
    y_ref, _ = nf4_linear_reference(xr, packed, absmax, 64, shape, bias, None, None, 1.0, None)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, g)
    tol = _tolerance(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_dropout_keeps_x_lora_not_x(dtype, quantized):
    x, w, a, b, bias = _tensors(dtype, seed=1)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    keep = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > 0.3).to(dtype) / 0.7
    x_lora = x * keep  # dropout(x) as the caller makes it, with a known mask
    if quantized:
        packed, state = quantize_nf4(w, blocksize=64)
        absmax, shape = state.absmax_fp32(), list(state.shape)
        y, saved = _saved_during(lambda: nf4_linear(x, packed, state, bias, a, b, 0.5, x_lora))

        def reference(*args):
            return nf4_linear_reference(args[0], packed, absmax, 64, shape, bias, args[1], args[2], 0.5, args[3])[0]
    else:
        y, saved = _saved_during(lambda: lora_linear(x, w, bias, a, b, 0.5, x_lora))

        def reference(*args):
            return lora_linear_reference(args[0], w, bias, args[1], args[2], 0.5, args[3])[0]
    assert any(t is x_lora for t in saved), "dropout's output is what dA reads"
    assert not any(t is x for t in saved)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), g)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    expected = torch.autograd.grad(reference(leaves[0], leaves[1], leaves[2], leaves[0] * keep), leaves, g)
    tol = _tolerance(dtype)
    for name, got_t, exp_t in zip(("dx", "dA", "dB"), got, expected, strict=True):
        torch.testing.assert_close(got_t, exp_t, **tol, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_without_dropout_keeps_x_and_a_frozen_A_does_not(dtype):
    x, w, a, b, bias = _tensors(dtype, seed=3)
    x.requires_grad_(True)
    b.requires_grad_(True)
    a.requires_grad_(True)
    _, saved = _saved_during(lambda: lora_linear(x, w, bias, a, b, 0.5))
    assert any(t is x for t in saved), "dA = dh^T x needs x"
    a.requires_grad_(False)
    y, saved = _saved_during(lambda: lora_linear(x, w, bias, a, b, 0.5))
    assert not _keeps_a_copy_of(saved, x)
    g = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, b), g)
    xr, br = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    dx_ref, db_ref = torch.autograd.grad(lora_linear_reference(xr, w, bias, a, br, 0.5, None)[0], (xr, br), g)
    tol = _tolerance(dtype)
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(db, db_ref, **tol)


def _backward_kernels():
    """(name, lora_linear_backward, nf4_linear_backward) per backend runnable here."""
    kernels = [("reference", _lora_fused.lora_linear_backward_fused, _lora_fused.nf4_linear_backward_fused),
               ("cpu", _lora_fused.lora_linear_backward_fused, cpu_lora.nf4_linear_backward_cpu)]
    try:
        from npu_ft.ops.backends.cuda import lora as cuda_lora
    except ImportError:  # no triton on this platform
        return kernels
    return kernels + [("cuda-triton", cuda_lora.lora_linear_backward, cuda_lora.nf4_linear_backward)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, dense_bwd, nf4_bwd", _backward_kernels(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_backward_kernels_read_only_the_shape_of_a_stand_in(backend, dense_bwd, nf4_bwd, dtype):
    """Where x is not kept, every backend's backward gives the same results from a NaN stand-in."""
    x, w, a, b, _ = _tensors(dtype, seed=4)
    stand_in = torch.full((), float("nan"), dtype=dtype).expand(x.shape)
    g = torch.randn(x.shape[:-1] + (OUT,), generator=torch.Generator().manual_seed(5)).to(dtype)
    x_lora = x * 0.5
    h = x_lora @ a.t()
    packed, state = quantize_nf4(w, blocksize=64)
    absmax, shape = state.absmax_fp32(), list(state.shape)
    calls = {
        "nf4 without an adapter": lambda xx: nf4_bwd(g, xx, packed, absmax, 64, shape, None, None, x.new_empty(0), 1.0,
                                                     None, [True, False, False, False, True]),
        "nf4 with dropout": lambda xx: nf4_bwd(g, xx, packed, absmax, 64, shape, a, b, h, 0.5, x_lora,
                                               [True, True, True, True, True]),
        "dense with dropout": lambda xx: dense_bwd(g, xx, w, a, b, h, 0.5, x_lora, [True, True, True, True, True]),
        "dense, A frozen": lambda xx: dense_bwd(g, xx, w, a, b, x @ a.t(), 0.5, None, [True, False, False, True, True]),
    }
    for case, call in calls.items():
        got, expected = call(stand_in), call(x)
        for name, got_t, exp_t in zip(("dx", "dx_lora", "dA", "dB", "dbias"), got, expected, strict=True):
            assert got_t.shape == exp_t.shape, (case, name)
            assert not got_t.isnan().any(), f"{backend}, {case}: {name} read the stand-in's data"
            torch.testing.assert_close(got_t, exp_t, rtol=0, atol=0, msg=f"{backend}, {case}: {name}")
