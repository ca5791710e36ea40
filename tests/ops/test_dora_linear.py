"""DoRA: ``DoraLinear`` against PEFT's ``lora.Linear`` / ``lora.Linear4bit`` with ``use_dora=True``,
the cpu kernels against the references (which form ``W + s*B@A``; the kernels do not), opcheck, what
backward saves, that no ``[out, in]`` tensor is built, and argument errors.

Tolerances: against PEFT, relative to each tensor's largest entry, fp32 1e-5 (measured ~3e-7), bf16
2e-2 (PEFT computes DoRA's epilogue in the adapters' dtype and rounds the base output first);
kernels vs reference as in ``_methods_helpers``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import npu_ft.ops  # noqa: F401  (registers the ops and the cpu kernels)
from npu_ft.modules import Nf4Linear
from npu_ft.modules.dora import DoraLinear
from npu_ft.ops import _registry
from npu_ft.ops import dora as D
from npu_ft.ops.backends import _fused_methods as F

from ._methods_helpers import DTYPE_PAIRS, SHAPES, close, method_args, nf4_args, saved_z, tol_dtype
from .test_modules import _Wrap

peft = pytest.importorskip("peft")


class _Wrap4bit(_Wrap):
    is_loaded_in_4bit = True  # what transformers sets; makes PEFT pick lora.Linear4bit


def _randomize(ref, mine, seed=2):
    """Train-like state on both: B random, magnitude moved away from the norm (identically)."""
    with torch.no_grad():
        torch.manual_seed(seed)
        ref.lora_B["default"].weight.normal_()
        ref.lora_magnitude_vector["default"].weight.mul_(torch.rand_like(ref.lora_magnitude_vector["default"].weight)
                                                          + 0.5)
        mine.lora_B.weight.copy_(ref.lora_B["default"].weight)
        mine.lora_magnitude_vector.copy_(ref.lora_magnitude_vector["default"].weight)


def _grads(layer, x, gy, seed=5):
    layer.train()
    xx = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # same dropout mask on both sides
    y = layer(xx)
    y.backward(gy)
    named = {n.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
             for n, p in layer.named_parameters() if p.requires_grad}
    return {"y": y.detach(), "x": xx.grad, **named}


def _compare_with_peft(ref, mine, x, gy, dtype):
    want, got = _grads(ref, x, gy), _grads(mine, x, gy)
    assert set(got) == set(want), (set(got), set(want))
    for k in want:
        close(got[k], want[k], dtype, k, rel=1e-5 if dtype == torch.float32 else 2e-2)


def _peft_dense(in_f, out_f, r, dtype, dropout=0.0, rslora=False, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=True).to(dtype)
    torch.manual_seed(seed + 1)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, lora_dropout=dropout, use_rslora=rslora, use_dora=True,
                          target_modules=["proj"])
    ref = peft.get_peft_model(_Wrap(copy.deepcopy(base)), cfg).base_model.model.proj
    torch.manual_seed(seed + 1)
    mine = DoraLinear(copy.deepcopy(base), r, 2 * r + 1, lora_dropout=dropout, use_rslora=rslora, **kw)
    return ref, mine


@pytest.mark.parametrize("in_f,out_f,r", [(33, 17, 4), (64, 96, 8), (7, 5, 1)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_matches_peft_fp32(in_f, out_f, r, dropout):
    ref, mine = _peft_dense(in_f, out_f, r, torch.float32, dropout=dropout)
    assert torch.equal(mine.lora_A.weight, ref.lora_A["default"].weight)  # same init, same RNG draws
    assert torch.equal(mine.lora_magnitude_vector, ref.lora_magnitude_vector["default"].weight)
    _randomize(ref, mine)
    for module in (ref, mine):
        module.base_layer.bias.requires_grad_(True)
    x, gy = torch.randn(2, 5, in_f), torch.randn(2, 5, out_f)
    _compare_with_peft(ref, mine, x, gy, torch.float32)


def test_matches_peft_rslora():
    ref, mine = _peft_dense(40, 24, 4, torch.float32, rslora=True)
    assert mine.scaling == pytest.approx(ref.scaling["default"])
    _randomize(ref, mine)
    _compare_with_peft(ref, mine, torch.randn(9, 40), torch.randn(9, 24), torch.float32)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_matches_peft_bf16_base_fp32_adapters(dropout):
    ref, mine = _peft_dense(48, 40, 4, torch.bfloat16, dropout=dropout)
    assert mine.lora_magnitude_vector.dtype == ref.lora_magnitude_vector["default"].weight.dtype == torch.float32
    assert torch.equal(mine.lora_magnitude_vector, ref.lora_magnitude_vector["default"].weight)
    _randomize(ref, mine)
    x, gy = torch.randn(3, 48).to(torch.bfloat16), torch.randn(3, 40).to(torch.bfloat16)
    _compare_with_peft(ref, mine, x, gy, torch.bfloat16)


@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.0)])
def test_matches_peft_dora_on_linear4bit(dtype, dropout):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = nn.Linear(128, 80).to(dtype)  # rows hold whole blocks: bnb's native CPU kernel is exact then
    q = bnb.nn.Linear4bit(128, 80, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                 compress_statistics=True)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")  # quantizes
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, target_modules=["proj"])
    ref = peft.get_peft_model(_Wrap4bit(q), cfg).base_model.model.proj
    torch.manual_seed(1)
    mine = DoraLinear(Nf4Linear.from_linear(lin, compute_dtype=dtype), 4, 8, lora_dropout=dropout)
    assert torch.equal(mine.lora_A.weight, ref.lora_A["default"].weight)
    torch.testing.assert_close(mine.lora_magnitude_vector, ref.lora_magnitude_vector["default"].weight,
                               rtol=1e-6, atol=0)
    _randomize(ref, mine)
    x, gy = torch.randn(2, 5, 128).to(dtype), torch.randn(2, 5, 80).to(dtype)
    _compare_with_peft(ref, mine, x, gy, dtype)


def test_merge_equals_forward_and_peft_merge():
    ref, mine = _peft_dense(40, 24, 4, torch.float32)
    _randomize(ref, mine)
    x = torch.randn(6, 40)
    with torch.no_grad():
        merged = mine.merge()
        torch.testing.assert_close(merged(x), mine.eval()(x), rtol=1e-5, atol=1e-5)
        ref.merge()
        torch.testing.assert_close(merged.weight, ref.base_layer.weight, rtol=1e-6, atol=1e-6)


def test_without_bias_backward_keeps_the_output_the_next_op_keeps_anyway():
    """No bias, no dropout: z = y / g, so DoRA saves y itself - SiLU, which follows gate_proj in a Qwen
    MLP, saves the same tensor, so the pair keeps one [T, out] activation, not two."""
    layer = DoraLinear(nn.Linear(32, 48, bias=False), 4, 8)
    x = torch.randn(10, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
        out = torch.nn.functional.silu(y)
    big = {t.untyped_storage().data_ptr() for t in saved if t.shape == (10, 48)}
    assert len(big) == 1 and y.untyped_storage().data_ptr() in big
    out.sum().backward()
    assert layer.lora_magnitude_vector.grad is not None


def test_frozen_a_saves_no_activation_of_in_features():
    """DoRA + LoRA-FA: backward keeps h [T, r] and z [T, out], never x [T, in]."""
    base = nn.Linear(48, 16)
    layer = DoraLinear(base, 4, 8, lora_fa=True)
    assert not layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    x = torch.randn(10, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.shape == x.shape for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert layer.lora_A.weight.grad is None and layer.lora_B.weight.grad is not None
    assert layer.lora_magnitude_vector.grad is not None and x.grad is not None


# ---------------------------------------------------------------------------------------------
# cpu kernels vs reference
# ---------------------------------------------------------------------------------------------

MASKS = [[True, True, True, True, True, True], [True, False, False, True, True, False],
         [False, True, False, False, True, True]]


def _check_kernels(fwd, fwd_ref, bwd, bwd_ref, fwd_args, bwd_tail, args, td, dropout):
    out, ref = fwd(*fwd_args), fwd_ref(*fwd_args)
    for name, o, rr in zip(("y", "h", "z", "norm"), out, ref, strict=True):
        close(o, rr, td, name)
    _, h, _, norm = ref
    z, z_is_y = saved_z(ref)
    assert z_is_y == (args["bias"] is None and not dropout)
    for mask in MASKS:
        mask = [mask[0], mask[1] and dropout, *mask[2:]]
        bargs = (args["grad"], args["x"], *bwd_tail, args["lora_A"], args["lora_B"], args["magnitude"], h, z, norm,
                 0.75, args["x_lora"], dropout, z_is_y, mask)
        got, want = bwd(*bargs), bwd_ref(*bargs)
        for name, o, rr, asked in zip(("dx", "dx_lora", "dA", "dB", "dmag", "dbias"), got, want, mask, strict=True):
            assert (o.numel() > 0) == asked, name
            close(o, rr, td, name)


@pytest.mark.parametrize("lead,in_f,out_f,r", SHAPES)
@pytest.mark.parametrize("xd,ld", DTYPE_PAIRS)
@pytest.mark.parametrize("bias,dropout", [(True, False), (False, False), (False, True), (True, True)])
def test_cpu_kernels_match_reference(lead, in_f, out_f, r, xd, ld, bias, dropout):
    a = method_args(lead, in_f, out_f, r, xd, ld, bias=bias, dropout=dropout)
    fwd_args = (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], a["weight_sq_norm"], 0.75,
                a["x_lora"])
    _check_kernels(F.dora_linear_fused, D.dora_linear_reference, F.dora_linear_backward_fused,
                   D.dora_linear_backward_reference, fwd_args, (a["weight"],), a, tol_dtype(xd, ld), dropout)


@pytest.mark.parametrize("lead,in_f,out_f,r", SHAPES[1:])
@pytest.mark.parametrize("xd,ld", DTYPE_PAIRS[:2])
@pytest.mark.parametrize("bias,dropout", [(True, False), (False, False), (True, True)])
def test_cpu_nf4_kernels_match_reference(lead, in_f, out_f, r, xd, ld, bias, dropout):
    a = method_args(lead, in_f, out_f, r, xd, ld, bias=bias, dropout=dropout)
    packed, state, _ = nf4_args(a)
    nf4 = (packed, state.absmax_fp32(), state.blocksize, list(state.shape))
    fwd_args = (a["x"], *nf4, a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], a["weight_sq_norm"], 0.75,
                a["x_lora"])
    _check_kernels(F.dora_nf4_linear_fused, D.dora_nf4_linear_reference, F.dora_nf4_linear_backward_fused,
                   D.dora_nf4_linear_backward_reference, fwd_args, nf4, a, tol_dtype(xd, ld), dropout)


@pytest.mark.parametrize("lead,in_f,out_f,r", SHAPES)
def test_weight_norm_decomposition_matches_the_materialized_norm(lead, in_f, out_f, r):
    a = method_args(lead, in_f, out_f, r, torch.float32, torch.float32)
    args = (a["weight"], a["weight_sq_norm"], a["lora_A"], a["lora_B"], 1.7)
    torch.testing.assert_close(F.dora_weight_norm_fused(*args), D.dora_weight_norm_reference(*args),
                               rtol=2e-6, atol=0)


def test_dense_kernels_never_build_an_out_by_in_tensor():
    """The fused forward and backward create no [out, in] tensor (the reference does: W + s*B@A)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    out_f, in_f = 40, 56
    a = method_args((9,), in_f, out_f, 4, torch.float32, torch.float32)

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and not func.is_view:  # views allocate nothing
                    self.seen.append((str(func), t.numel()))
            return out

    fwd = (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], a["weight_sq_norm"], 0.5, None)
    with Shapes() as mode:  # (a custom op called inside is one dispatch: its kernel is watched on its own)
        F.dora_weight_norm_fused(a["weight"], a["weight_sq_norm"], a["lora_A"], a["lora_B"], 0.5)
        out = F.dora_linear_fused(*fwd)
        F.dora_linear_backward_fused(a["grad"], a["x"], a["weight"], a["lora_A"], a["lora_B"], a["magnitude"], out[1],
                                     *saved_z(out)[:1], out[3], 0.5, None, False, saved_z(out)[1],
                                     [True, False, True, True, True, True])
    full_size = [s for s in mode.seen if s[1] == out_f * in_f]
    assert mode.seen and not full_size, full_size
    with Shapes() as mode:
        D.dora_linear_reference(*fwd)
    assert [s for s in mode.seen if s[1] == out_f * in_f]  # the check can see one


def test_op_dispatches_to_cpu_kernels():
    a = method_args((4,), 12, 10, 2, torch.float32, torch.float32)
    for k in ("x", "lora_A", "lora_B", "magnitude"):
        a[k].requires_grad_(True)
    _registry.reset_kernel_calls()
    y = D.dora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], a["weight_sq_norm"],
                      0.5)
    y.backward(a["grad"])
    for op in ("dora_linear", "dora_weight_norm", "dora_linear_backward"):
        assert _registry.kernel_calls(op) == {"cpu": 1}, op


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def _requires_grad(a, *names):
    for n in names:
        if a[n] is not None:
            a[n].requires_grad_(True)


@pytest.mark.parametrize("xd,ld,bias,dropout", [(torch.float32, torch.float32, True, True),
                                                (torch.float32, torch.float32, False, False),
                                                (torch.bfloat16, torch.float32, True, False)])
def test_opcheck_dora_linear(xd, ld, bias, dropout):
    a = method_args((2, 3), 12, 10, 4, xd, ld, bias=bias, dropout=dropout)
    _requires_grad(a, "x", "bias", "lora_A", "lora_B", "magnitude", "x_lora")
    torch.library.opcheck(torch.ops.npu_ft.dora_linear.default,
                          (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["magnitude"],
                           a["weight_sq_norm"], 0.5, a["x_lora"]))
    torch.library.opcheck(torch.ops.npu_ft.dora_weight_norm.default,
                          (a["weight"], a["weight_sq_norm"], a["lora_A"], a["lora_B"], 0.5))


@pytest.mark.parametrize("bias,dropout", [(True, False), (False, False), (True, True)])
def test_opcheck_dora_nf4_linear_and_backward_ops(bias, dropout):
    a = method_args((7,), 64, 10, 4, torch.float32, torch.float32, bias=bias, dropout=dropout)
    packed, state, _ = nf4_args(a)
    nf4 = (packed, state.absmax_fp32(), state.blocksize, list(state.shape))
    fwd = (a["x"], *nf4, a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], a["weight_sq_norm"], 0.5, a["x_lora"])
    out = D.dora_nf4_linear_reference(*fwd)
    z, z_is_y = saved_z(out)
    mask = [True, dropout, True, True, True, True]
    tail = (a["lora_A"], a["lora_B"], a["magnitude"], out[1], z, out[3], 0.5, a["x_lora"], dropout, z_is_y, mask)
    torch.library.opcheck(torch.ops.npu_ft.dora_nf4_linear_backward.default, (a["grad"], a["x"], *nf4, *tail))
    torch.library.opcheck(torch.ops.npu_ft.dora_linear_backward.default, (a["grad"], a["x"], a["weight"], *tail))
    frozen_a = [True, dropout, False, True, True, False]  # LoRA-FA: no x saved
    torch.library.opcheck(torch.ops.npu_ft.dora_linear_backward.default,
                          (a["grad"], None, a["weight"], *tail[:-4], None, dropout, z_is_y, frozen_a))
    _requires_grad(a, "x", "lora_A", "lora_B", "magnitude", "x_lora")
    torch.library.opcheck(torch.ops.npu_ft.dora_nf4_linear.default, fwd)


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------

BAD = [
    ("magnitude", lambda a: torch.ones(9), ValueError),
    ("magnitude", lambda a: torch.ones(10, 1), ValueError),
    ("magnitude", lambda a: torch.ones(10, dtype=torch.int64), TypeError),
    ("weight_sq_norm", lambda a: torch.ones(3), ValueError),
    ("lora_A", lambda a: torch.randn(2, 11), ValueError),
    ("lora_B", lambda a: torch.randn(10, 3), ValueError),
    ("scaling", lambda a: float("nan"), ValueError),
    ("x", lambda a: torch.randn(4, 13), ValueError),
    ("weight", lambda a: a["weight"].double(), TypeError),
]


@pytest.mark.parametrize("name,make,exc", BAD)
def test_bad_inputs_name_the_argument(name, make, exc):
    a = method_args((4,), 12, 10, 2, torch.float32, torch.float32)
    kwargs = {k: a[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude", "weight_sq_norm")}
    kwargs["scaling"] = 0.5
    kwargs[name] = make(a)
    _registry.reset_kernel_calls()
    with pytest.raises(exc, match=rf"^{name}"):
        D.dora_linear(**kwargs)
    assert _registry.kernel_calls("dora_linear") == {}


def test_doctor_rows_pass_on_cpu():
    from npu_ft import doctor
    from npu_ft.ops import lora_fa

    specs = D.doctor_checks() + lora_fa.doctor_checks()
    results = [doctor.run_check(doctor.Check(**spec), torch.device("cpu")) for spec in specs]
    assert [r.op for r in results[:2]] == ["dora_linear fwd+bwd", "dora_nf4_linear fwd+bwd"]
    for r in results:
        assert r.passed and r.kernel == "cpu", r


def test_pissa_init_under_dora_matches_peft():
    """DoRA + PiSSA: A, B and the residual base as PEFT's PiSSA, the magnitude from the residual + B@A."""
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    torch.manual_seed(1)
    peft_ref = peft.get_peft_model(_Wrap(copy.deepcopy(base)), peft.LoraConfig(
        r=4, lora_alpha=9, use_dora=True, init_lora_weights="pissa", target_modules=["proj"])).base_model.model.proj
    torch.manual_seed(1)
    ours = DoraLinear(copy.deepcopy(base), 4, 9, init_lora_weights="pissa")
    for got, want in ((ours.lora_A.weight, peft_ref.lora_A["default"].weight),
                      (ours.lora_B.weight, peft_ref.lora_B["default"].weight),
                      (ours.base_layer.weight, peft_ref.base_layer.weight),
                      (ours.lora_magnitude_vector, peft_ref.lora_magnitude_vector["default"].weight)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    x = torch.randn(5, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), base(x), rtol=1e-4, atol=1e-5)  # PiSSA + DoRA leaves the layer as it was
