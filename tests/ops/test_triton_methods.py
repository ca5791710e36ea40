"""The CUDA backend's kernels of the LoRA-family ops (``npu_ft/ops/backends/cuda/methods.py``) against
the references. Without a GPU they run under ``TRITON_INTERPRET=1`` (tests/conftest.py) on CPU
tensors, calling the launchers directly; with a GPU the same tests run on it. Tolerances: those of
``_methods_helpers`` (fp32 2e-5, bf16 3e-2 relative to each tensor's largest entry). Shapes are small
and awkward (odd sizes, not multiples of any block) so the interpreter stays fast. The sm_90 compile of
the DoRA kernels is part of tests/ops/test_triton_kernels.py::test_kernels_compile_for_h100_without_a_gpu."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from npu_ft.ops import dora as D  # noqa: E402
from npu_ft.ops import lora_fa as FA  # noqa: E402
from npu_ft.ops.backends.cuda import methods as K  # noqa: E402

from ._methods_helpers import close, method_args, nf4_args, saved_z, tol_dtype  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [((5,), 13, 7, 3), ((2, 9), 33, 67, 5)]
PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


def test_row_norm_scale_and_grad_kernels_against_torch():
    g = torch.Generator().manual_seed(0)
    out_f, r, M = 67, 5, 41
    wa, bg, b = (torch.randn(out_f, r, generator=g).to(DEVICE) for _ in range(3))
    wsq = (torch.rand(out_f, generator=g) * 10 + 5).to(DEVICE)
    want = (wsq + (b * (2 * 0.7 * wa + 0.49 * bg)).sum(1)).clamp_min(0).sqrt()
    torch.testing.assert_close(K.dora_row_norm(wa, bg, b, wsq, 0.7), want, rtol=1e-6, atol=1e-6)
    z = torch.randn(M, out_f, generator=g).to(DEVICE)
    scale, bias = torch.rand(out_f, generator=g).to(DEVICE), torch.randn(out_f, generator=g).to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        torch.testing.assert_close(K.dora_scale(z.to(dtype), scale, bias.to(dtype), dtype),
                                   (z.to(dtype).float() * scale + bias.to(dtype).float()).to(dtype), rtol=0, atol=0)
        gy = torch.randn(M, out_f, generator=g).to(dtype).to(DEVICE)
        gz, col = K.dora_grad(gy, z.to(dtype), scale)
        torch.testing.assert_close(gz, (gy.float() * scale).to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(col, (gy.float() * z.to(dtype).float()).sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lead,in_f,out_f,r", CASES)
@pytest.mark.parametrize("xd,ld", PAIRS)
@pytest.mark.parametrize("bias,dropout", [(True, False), (False, False), (False, True)])
def test_dora_kernels_match_reference(lead, in_f, out_f, r, xd, ld, bias, dropout):
    a = method_args(lead, in_f, out_f, r, xd, ld, bias=bias, dropout=dropout, device=DEVICE)
    td = tol_dtype(xd, ld)
    fwd = (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], a["weight_sq_norm"], 0.6,
           a["x_lora"])
    ref = D.dora_linear_reference(*fwd)
    for name, o, rr in zip(("y", "h", "z", "norm"), K.dora_linear(*fwd), ref, strict=True):
        close(o, rr, td, name)
    _, h, _, norm = ref
    mask = [True, dropout, True, True, True, bias]
    bwd = (a["grad"], a["x"], a["weight"], a["lora_A"], a["lora_B"], a["magnitude"], h, saved_z(ref)[0], norm, 0.6,
           a["x_lora"], dropout, saved_z(ref)[1], mask)
    for name, o, rr in zip(("dx", "dx_lora", "dA", "dB", "dmag", "dbias"), K.dora_linear_backward(*bwd),
                           D.dora_linear_backward_reference(*bwd), strict=True):
        close(o, rr, td, name)


@pytest.mark.parametrize("xd,ld", PAIRS[:2])
def test_dora_nf4_kernels_match_reference(xd, ld):
    a = method_args((2, 5), 64, 33, 4, xd, ld, bias=False, device=DEVICE)
    packed, state, _ = nf4_args(a)
    nf4 = (packed, state.absmax_fp32(), state.blocksize, list(state.shape))
    fwd = (a["x"], *nf4, a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], a["weight_sq_norm"], 0.6, None)
    ref = D.dora_nf4_linear_reference(*fwd)
    for name, o, rr in zip(("y", "h", "z", "norm"), K.dora_nf4_linear(*fwd), ref, strict=True):
        close(o, rr, tol_dtype(xd, ld), name)
    bwd = (a["grad"], None, *nf4, a["lora_A"], a["lora_B"], a["magnitude"], ref[1], saved_z(ref)[0], ref[3], 0.6,
           None, False, saved_z(ref)[1], [True, False, False, True, True, False])  # LoRA-FA over DoRA: no x
    for name, o, rr in zip(("dx", "dx_lora", "dA", "dB", "dmag", "dbias"), K.dora_nf4_linear_backward(*bwd),
                           D.dora_nf4_linear_backward_reference(*bwd), strict=True):
        close(o, rr, tol_dtype(xd, ld), name)


@pytest.mark.parametrize("lead,in_f,out_f,r", CASES)
@pytest.mark.parametrize("xd,ld", PAIRS)
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_fa_backward_kernels_match_reference(lead, in_f, out_f, r, xd, ld, dropout):
    a = method_args(lead, in_f, out_f, r, xd, ld, dropout=dropout, device=DEVICE)
    h = torch.nn.functional.linear(a["x"].to(ld) if a["x_lora"] is None else a["x_lora"], a["lora_A"])
    args = (a["grad"], a["weight"], a["lora_A"], a["lora_B"], h, 0.6, dropout, [True, dropout, True, True])
    for name, o, rr in zip(("dx", "dx_lora", "dB", "dbias"), K.lora_fa_linear_backward(*args),
                           FA.lora_fa_linear_backward_reference(*args), strict=True):
        close(o, rr, tol_dtype(xd, ld), name)
    packed, state, _ = nf4_args(a)
    nf4 = (packed, state.absmax_fp32(), state.blocksize, list(state.shape))
    args = (a["grad"], *nf4, a["lora_A"], a["lora_B"], h, 0.6, dropout, [True, dropout, True, True])
    for name, o, rr in zip(("dx", "dx_lora", "dB", "dbias"), K.lora_fa_nf4_linear_backward(*args),
                           FA.lora_fa_nf4_linear_backward_reference(*args), strict=True):
        close(o, rr, tol_dtype(xd, ld), name)

