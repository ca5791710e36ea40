"""The CUDA backend's Triton kernels of rms_norm, rope and swiglu against the oracle (transformers'
formulas, float32 autograd), with the op registry's tolerances, on small awkward shapes.

Without a GPU they run under ``TRITON_INTERPRET=1`` (tests/conftest.py) on CPU tensors, calling the
launchers directly; on a GPU the same tests run there, and the ``cuda``-marked test also checks the
dispatch of the public ops.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from npu_ft.ops import kernel_calls, reset_kernel_calls, tolerance  # noqa: E402
from npu_ft.ops import rms_norm as rn  # noqa: E402
from npu_ft.ops import rope as rp  # noqa: E402
from npu_ft.ops import swiglu as sw  # noqa: E402
from npu_ft.ops.backends.cuda import block_ops as K  # noqa: E402
from tests.ops.test_block_ops import _cos_sin, _oracle_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _close(op, got, ref, dtype, what):
    assert got.shape == ref.shape, what
    tolerance(op, dtype).assert_close(got.float().cpu(), ref.float().cpu(), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,hidden,residual", [((1,), 37, False), ((3, 2), 129, True), ((5,), 64, True),
                                                  ((2,), 1000, False)], ids=str)
def test_rms_norm(lead, hidden, residual, dtype):
    x = _rand(*lead, hidden, dtype=dtype, seed=hidden)
    res = _rand(*lead, hidden, dtype=dtype, seed=1) if residual else None
    w = _rand(hidden, dtype=dtype, seed=2, scale=0.3) + 1
    y, h, rstd = K.rms_norm(x, w, 1e-6, res)
    gy = _rand(*lead, hidden, dtype=dtype, seed=3)
    gh = _rand(*lead, hidden, dtype=dtype, seed=4) if residual else None
    inputs = {"x": x.cpu(), "weight": w.cpu()} | ({"residual": res.cpu()} if residual else {})
    grads_out = (gy.cpu(), gh.cpu() if residual else None)
    (ry, rh), rg = _oracle_grads(lambda **kw: rn.rms_norm_oracle(eps=1e-6, **kw), inputs, grads_out)
    _close("rms_norm", y, ry, dtype, "y")
    if residual:
        assert torch.equal(h.cpu(), (x + res).cpu())
    dx, dw = K.rms_norm_backward(gy, gh, h if residual else x, w, rstd, [True, True])
    _close("rms_norm_backward", dx, rg["x"], dtype, "dx")
    _close("rms_norm_backward", dw, rg["weight"], dtype, "dweight")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,hq,hk,seq,dim,per_batch", [(1, 3, 1, 5, 6, False), (2, 4, 2, 3, 64, True),
                                                           (1, 2, 2, 1, 18, False)], ids=str)
def test_rope(batch, hq, hk, seq, dim, per_batch, dtype):
    q = _rand(batch, seq, hq, dim, dtype=dtype, seed=1).transpose(1, 2)
    k = _rand(batch, seq, hk, dim, dtype=dtype, seed=2).transpose(1, 2)
    rows = batch if per_batch else 1
    cos, sin = (t.to(DEVICE) for t in _cos_sin(torch.arange(seq).expand(rows, -1) + torch.arange(rows)[:, None],
                                               dim, dtype))
    qo, ko = K.rope(q, k, cos, sin)
    assert qo.stride() == q.stride()
    gq, gk = _rand(*qo.shape, dtype=dtype, seed=5), _rand(*ko.shape, dtype=dtype, seed=6)
    (rq, rk), rg = _oracle_grads(rp.rope_oracle, {"q": q.cpu(), "k": k.cpu(), "cos": cos.cpu(), "sin": sin.cpu()},
                                 (gq.cpu(), gk.cpu()))
    _close("rope", qo, rq, dtype, "q")
    _close("rope", ko, rk, dtype, "k")
    dq, dk = K.rope_backward(gq, gk, cos, sin)
    _close("rope_backward", dq, rg["q"], dtype, "dq")
    _close("rope_backward", dk, rg["k"], dtype, "dk")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (3, 67), (2, 4101)], ids=str)
def test_swiglu(shape, dtype):
    gate, up = _rand(*shape, dtype=dtype, seed=1, scale=3), _rand(*shape, dtype=dtype, seed=2)
    out = K.swiglu(gate, up)
    grad = _rand(*shape, dtype=dtype, seed=3)
    (ref,), rg = _oracle_grads(sw.swiglu_oracle, {"gate": gate.cpu(), "up": up.cpu()}, (grad.cpu(),))
    _close("swiglu", out, ref, dtype, "out")
    dg, du = K.swiglu_backward(grad, gate, up, [True, True])
    _close("swiglu_backward", dg, rg["gate"], dtype, "dgate")
    _close("swiglu_backward", du, rg["up"], dtype, "dup")
    assert K.swiglu_backward(grad, gate, up, [False, True])[0].numel() == 0


@pytest.mark.cuda
def test_public_ops_dispatch_to_the_cuda_kernels():
    reset_kernel_calls()
    x = _rand(4, 33).requires_grad_(True)
    w = (_rand(33) + 1).requires_grad_(True)
    rn.rms_norm(x, w, 1e-6)[0].sum().backward()
    sw.swiglu(x, x.detach() * 2).sum().backward()
    for op in ("rms_norm", "rms_norm_backward", "swiglu", "swiglu_backward"):
        assert kernel_calls(op).get("cuda", 0) >= 1, (op, kernel_calls(op))
