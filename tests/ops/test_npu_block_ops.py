"""npu kernels of rms_norm, rope and swiglu (npu_ft/ops/backends/npu/block_ops.py) on the fake npu
device, with a stand-in ``torch_npu`` that implements the documented signatures of
``npu_rms_norm``, ``npu_add_rms_norm``, ``npu_rotary_mul`` and ``npu_swiglu`` in plain torch.

This checks the glue: which torch_npu function is called, with which layout and arguments, and
that the results and gradients then equal the oracle's. It says nothing about the NPU's arithmetic
(the stand-in is plain torch on the fake device's CPU memory); that takes real hardware
(``npu-ft doctor`` on an Ascend box).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from npu_ft.ops import kernel_calls, reset_kernel_calls, tolerance
from npu_ft.ops import rms_norm as rn
from npu_ft.ops import rope as rp
from npu_ft.ops import swiglu as sw
from tests.fake_npu.fixtures import fake_npu  # noqa: F401  (module-scoped fixture)
from tests.ops.test_block_ops import _cos_sin, _oracle_grads


def make_stand_in(calls: list) -> types.ModuleType:
    """A ``torch_npu`` module with the fused ops' documented signatures, in plain torch; each call
    is appended to ``calls`` as ``(name, shapes of the tensor arguments)``."""

    def record(name, *tensors):
        calls.append((name, tuple(tuple(t.shape) for t in tensors)))

    def norm(x, gamma, epsilon):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + epsilon)
        return (x32 * rstd * gamma.float()).to(x.dtype), rstd

    def npu_rms_norm(self, gamma, epsilon=1e-6):
        assert self.dtype == gamma.dtype, "gamma must have self's dtype"
        record("npu_rms_norm", self, gamma)
        return norm(self, gamma, epsilon)

    def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
        assert x1.dtype == x2.dtype == gamma.dtype
        record("npu_add_rms_norm", x1, x2, gamma)
        x = x1 + x2
        y, rstd = norm(x, gamma, epsilon)
        return y, rstd, x

    def npu_rotary_mul(input, r1, r2, rotary_mode="half"):
        assert input.dim() == r1.dim() == r2.dim() == 4 and rotary_mode == "half"
        assert input.is_contiguous(), "non-contiguous input"
        torch.broadcast_shapes(input.shape, r1.shape, r2.shape)
        record("npu_rotary_mul", input, r1, r2)
        return r1 * input + r2 * rp.rotate_half(input)

    def npu_swiglu(input, dim=-1):
        assert input.is_contiguous() and input.shape[dim] % 2 == 0
        record("npu_swiglu", input)
        a, b = input.chunk(2, dim=dim)
        return torch.nn.functional.silu(a) * b

    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    for fn in (npu_rms_norm, npu_add_rms_norm, npu_rotary_mul, npu_swiglu):
        setattr(module, fn.__name__, fn)
    return module


@pytest.fixture
def torch_npu_calls(fake_npu, monkeypatch):  # noqa: F811
    """The stand-in torch_npu, imported (sys.modules): yields the list of its calls."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "torch_npu", make_stand_in(calls))
    reset_kernel_calls()
    return calls


@pytest.fixture
def no_torch_npu(fake_npu, monkeypatch):  # noqa: F811
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    reset_kernel_calls()


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _close(op, got, ref, dtype, what):
    assert got.device.type == "npu", what
    tolerance(op, dtype).assert_close(got.float().cpu(), ref.float(), msg=lambda m: f"{what}: {m}")


def _only_npu(*ops):
    for op in ops:
        seen = kernel_calls(op)
        assert seen.get("npu", 0) >= 1 and not seen.get("reference"), (op, seen)


def _leaves(npu, **tensors):
    return {k: v.to(npu).requires_grad_(True) for k, v in tensors.items()}


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_calls_torch_npu(torch_npu_calls, fake_npu, residual, dtype):  # noqa: F811
    x, w = _rand(2, 5, 67, dtype=dtype), _rand(67, dtype=dtype, seed=1, scale=0.2) + 1
    res = _rand(2, 5, 67, dtype=dtype, seed=2) if residual else None
    inputs = {"x": x, "weight": w} | ({"residual": res} if residual else {})
    dev = _leaves(fake_npu, **inputs)
    y, h = rn.rms_norm(dev["x"], dev["weight"], 1e-6, dev.get("residual"))
    gy = _rand(2, 5, 67, dtype=dtype, seed=3)
    y.backward(gy.to(fake_npu))
    (ry, _), rg = _oracle_grads(lambda **kw: rn.rms_norm_oracle(eps=1e-6, **kw), inputs, (gy, None))
    _close("rms_norm", y, ry, dtype, "y")
    for name in inputs:
        _close("rms_norm_backward", dev[name].grad, rg[name], dtype, f"d{name}")
    names = [c[0] for c in torch_npu_calls]
    assert names == (["npu_add_rms_norm"] if residual else ["npu_rms_norm"])
    _only_npu("rms_norm", "rms_norm_backward")


def test_rms_norm_mixed_dtypes_use_the_reference(torch_npu_calls, fake_npu):  # noqa: F811
    x, w = _rand(3, 40, dtype=torch.bfloat16).to(fake_npu), (_rand(40) + 1).to(fake_npu)
    y, _ = rn.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32 and torch_npu_calls == []  # npu_rms_norm needs one dtype
    _close("rms_norm", y, rn.rms_norm_oracle(x.cpu(), w.cpu(), 1e-5)[0], torch.bfloat16, "y")


@pytest.mark.parametrize("layout", ["bsnd", "bnsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_calls_npu_rotary_mul(torch_npu_calls, fake_npu, layout, dtype):  # noqa: F811
    batch, hq, hk, seq, dim = 2, 4, 2, 9, 64
    if layout == "bsnd":  # what transformers passes: the projection [B, S, N, D] transposed
        q, k = (_rand(batch, seq, n, dim, dtype=dtype, seed=n).transpose(1, 2) for n in (hq, hk))
    else:
        q, k = (_rand(batch, n, seq, dim, dtype=dtype, seed=n) for n in (hq, hk))
    positions = torch.cat([torch.arange(4), torch.arange(5)]).expand(batch, -1)  # two packed sequences
    cos, sin = _cos_sin(positions, dim, dtype)
    dev = {"q": q.to(fake_npu).detach().requires_grad_(True), "k": k.to(fake_npu).detach().requires_grad_(True)}
    qo, ko = rp.rope(dev["q"], dev["k"], cos.to(fake_npu), sin.to(fake_npu))
    gq, gk = _rand(*qo.shape, dtype=dtype, seed=7), _rand(*ko.shape, dtype=dtype, seed=8)
    torch.autograd.backward([qo, ko], [gq.to(fake_npu), gk.to(fake_npu)])
    (rq, rk), rg = _oracle_grads(rp.rope_oracle, {"q": q, "k": k, "cos": cos, "sin": sin}, (gq, gk))
    _close("rope", qo, rq, dtype, "q")
    _close("rope", ko, rk, dtype, "k")
    _close("rope_backward", dev["q"].grad, rg["q"], dtype, "dq")
    _close("rope_backward", dev["k"].grad, rg["k"], dtype, "dk")
    assert qo.stride() == dev["q"].stride()
    shapes = [c[1] for c in torch_npu_calls]
    assert [c[0] for c in torch_npu_calls] == ["npu_rotary_mul"] * 4  # q and k, forward and backward
    cs = (batch, seq, 1, dim) if layout == "bsnd" else (batch, 1, seq, dim)
    assert shapes[0] == (((batch, seq, hq, dim) if layout == "bsnd" else (batch, hq, seq, dim)), cs, cs)
    _only_npu("rope", "rope_backward")


def test_rope_outside_the_documented_limits_uses_the_reference(torch_npu_calls, fake_npu):  # noqa: F811
    q = _rand(1, 3, 5, 18).to(fake_npu)  # head dim 18: not a multiple of 64
    cos, sin = _cos_sin(torch.arange(5)[None], 18, torch.float32)
    qo, _ = rp.rope(q, q[:, :1], cos.to(fake_npu), sin.to(fake_npu))
    assert torch_npu_calls == []
    _close("rope", qo, rp.rope_oracle(q.cpu(), q[:, :1].cpu(), cos, sin)[0], torch.float32, "q")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_calls_npu_swiglu(torch_npu_calls, fake_npu, dtype):  # noqa: F811
    gate, up = _rand(3, 7, 100, dtype=dtype, scale=3), _rand(3, 7, 100, dtype=dtype, seed=1)
    dev = _leaves(fake_npu, gate=gate, up=up)
    out = sw.swiglu(dev["gate"], dev["up"])
    grad = _rand(3, 7, 100, dtype=dtype, seed=2)
    out.backward(grad.to(fake_npu))
    (ref,), rg = _oracle_grads(sw.swiglu_oracle, {"gate": gate, "up": up}, (grad,))
    _close("swiglu", out, ref, dtype, "out")
    _close("swiglu_backward", dev["gate"].grad, rg["gate"], dtype, "dgate")
    _close("swiglu_backward", dev["up"].grad, rg["up"], dtype, "dup")
    assert torch_npu_calls == [("npu_swiglu", ((3, 7, 200),))]
    _only_npu("swiglu", "swiglu_backward")


def test_swiglu_on_a_first_generation_910_uses_the_reference(torch_npu_calls, fake_npu, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch.npu, "get_device_name", lambda index=0: "Ascend910ProA", raising=False)
    gate, up = _rand(4, 10).to(fake_npu), _rand(4, 10, seed=1).to(fake_npu)
    out = sw.swiglu(gate, up)
    assert torch_npu_calls == []
    _close("swiglu", out, sw.swiglu_oracle(gate.cpu(), up.cpu()), torch.float32, "out")


def test_without_torch_npu_the_reference_math_runs_on_the_npu_kernels(no_torch_npu, fake_npu):  # noqa: F811
    x = _rand(2, 3, 64).to(fake_npu)
    w = (_rand(64) + 1).to(fake_npu)
    y, h = rn.rms_norm(x, w, 1e-6, residual=x)
    ref_y, ref_h = rn.rms_norm_oracle(x.cpu(), w.cpu(), 1e-6, x.cpu())
    _close("rms_norm", y, ref_y, torch.float32, "y")
    assert torch.equal(h.cpu(), ref_h)
    q = _rand(1, 2, 3, 64).to(fake_npu)
    cos, sin = _cos_sin(torch.arange(3)[None], 64, torch.float32)
    _close("rope", rp.rope(q, q, cos.to(fake_npu), sin.to(fake_npu))[0], rp.rope_oracle(q.cpu(), q.cpu(), cos, sin)[0],
           torch.float32, "q")
    _close("swiglu", sw.swiglu(x, x), sw.swiglu_oracle(x.cpu(), x.cpu()), torch.float32, "out")
    _only_npu("rms_norm", "rope", "swiglu")
