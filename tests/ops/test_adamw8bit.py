"""The ``adamw8bit_update`` op: every kernel against the reference, opcheck, argument errors, doctor.

Bounds asserted (10 steps from the same states, fresh random gradients each step):
* cpu kernel (chunked) and npu kernel (fake npu device): bit-identical to the reference: parameter,
  uint8 states and absmax.
* Triton kernel (cuda backend, under ``TRITON_INTERPRET=1`` without a GPU), each step started from
  the reference's previous state: uint8 codes at most one apart (a moment on a code boundary may
  round to the neighbouring code where the float order differs), absmax within rtol 1e-6 of the
  reference's, the parameter within fp32 rtol=atol=1e-6 (bf16: one bf16 ulp, rtol 2**-7).

Byte-identity with bitsandbytes' own AdamW8bit is tested in tests/optim/test_bnb_parity.py.
"""

from __future__ import annotations

import pytest
import torch

import npu_ft.ops
from npu_ft.ops import _registry, kernel_calls, reset_kernel_calls
from npu_ft.ops import adamw8bit as A
from tests.fake_npu.fixtures import fake_npu  # noqa: F401  (module-scoped fixture)

# awkward sizes: 1 element, a partial single block, full blocks plus a tail, a 3-D parameter
NUMELS = [(1,), (200,), (3, 300), (2, 257, 9)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
STEPS = 10


def _setup(shape, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).to(dtype)
    n = p.numel()
    states = [torch.zeros(shape, dtype=torch.uint8), torch.zeros(shape, dtype=torch.uint8),
              torch.zeros(A.state_blocks(n)), torch.zeros(A.state_blocks(n))]
    return gen, p.to(device), [s.to(device) for s in states]


def _grad(gen, p, step):
    g = torch.randn(p.shape, generator=gen).to(p.dtype)
    if p.numel() > 600 and step % 3:
        g.view(-1)[256:512] = 0  # a block that gets no gradient: its states decay towards code 0
    return g


def _maps(device="cpu"):
    return A.signed_dynamic_map(device), A.unsigned_dynamic_map(device)


def _run(update, shape, dtype, device="cpu", seed=0, **hyper):
    gen, p, states = _setup(shape, dtype, seed, device)
    for step in range(1, STEPS + 1):
        update(p, _grad(gen, p, step).to(device), *states, *_maps(device), **{**HYPER, **hyper}, step=step)
    return p.cpu(), [s.cpu() for s in states]


def _reference(p, g, s1, s2, a1, a2, m1, m2, **kw):
    A.adamw8bit_update_reference(p, g, s1, s2, a1, a2, m1, m2, kw["lr"], kw["beta1"], kw["beta2"], kw["eps"],
                                 kw["weight_decay"], kw["step"])


def _assert_same(got, want, what):
    (p, states), (p_ref, states_ref) = got, want
    assert torch.equal(p, p_ref), f"{what}: parameter differs, max {(p.float() - p_ref.float()).abs().max()}"
    for name, s, r in zip(("state1", "state2", "absmax1", "absmax2"), states, states_ref, strict=True):
        assert torch.equal(s, r), f"{what}: {name} differs"


def test_code_maps_are_bitsandbytes_maps():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(A.signed_dynamic_map(), F.create_dynamic_map(signed=True))
    assert torch.equal(A.unsigned_dynamic_map(), F.create_dynamic_map(signed=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NUMELS)
def test_cpu_kernel_is_bit_identical_to_reference(shape, dtype):
    assert "cpu" in _registry.REGISTERED["adamw8bit_update"]
    reset_kernel_calls()
    got = _run(A.adamw8bit_update, shape, dtype)
    assert kernel_calls("adamw8bit_update") == {"cpu": STEPS}
    _assert_same(got, _run(_reference, shape, dtype), f"cpu {shape} {dtype}")


@pytest.mark.parametrize("chunk_blocks", [1, 3])
def test_chunks_of_blocks_equal_the_whole_tensor(chunk_blocks):
    """Slices of whole blocks (several chunks, a partial last one) give the whole-tensor result."""

    def chunked(p, g, s1, s2, a1, a2, m1, m2, **kw):
        A.adamw8bit_update_chunked(p, g, s1, s2, a1, a2, m1, m2, kw["lr"], kw["beta1"], kw["beta2"], kw["eps"],
                                   kw["weight_decay"], kw["step"], chunk_blocks=chunk_blocks)

    for dtype in (torch.float32, torch.bfloat16):
        _assert_same(_run(chunked, (5, 333), dtype), _run(_reference, (5, 333), dtype), f"chunks of {chunk_blocks}")


def test_first_step_from_zero_states():
    """Step 1: m = (1 - beta1) g exactly before quantization (its absmax is stored), m dequantizes
    to within half a code step of it, and without weight decay p moves by lr * sign(g) (Adam's first step)."""
    gen, p, states = _setup((700,), torch.float32, seed=3)
    p0, g = p.clone(), torch.randn(700, generator=gen)
    A.adamw8bit_update(p, g, *states, *_maps(), **{**HYPER, "weight_decay": 0.0}, step=1)
    m_exact = g * (1.0 - HYPER["beta1"])
    block_max = torch.stack([m_exact[i : i + 256].abs().max() for i in range(0, 700, 256)])
    assert torch.equal(states[2], block_max)
    m = npu_ft.ops.nf4.dequantize_blockwise_8bit_reference(states[0], states[2], A.signed_dynamic_map(), 256,
                                                           torch.float32)
    # the signed map's coarsest spacing (64 steps over [0.1, 1] of the block's absmax) bounds the error
    torch.testing.assert_close(m, m_exact, rtol=0, atol=0.0075 * float(block_max.max()))
    torch.testing.assert_close(p0 - p, HYPER["lr"] * torch.sign(g), rtol=1e-4, atol=1e-7)


def test_opcheck():
    gen, p, states = _setup((3, 300), torch.float32, seed=4)
    g = torch.randn(p.shape, generator=gen)
    args = (p, g, *states, *_maps(), 1e-3, 0.9, 0.999, 1e-8, 0.01, 2)
    torch.library.opcheck(torch.ops.npu_ft.adamw8bit_update.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(g=a["g"][:-1]), "g: shape"),
        (lambda a: a.update(state1=a["state1"].float()), "state1: dtype float32"),
        (lambda a: a.update(absmax2=a["absmax2"][:-1]), "absmax2: one per block"),
        (lambda a: a.update(qmap1=a["qmap1"][:100]), "qmap1: size"),
        (lambda a: a.update(p=a["p"].t()), "p: must be contiguous"),
        (lambda a: a.update(beta1=1.0), "beta1: 1.0 out of range"),
        (lambda a: a.update(step=0), "step: expected an int >= 1"),
        (lambda a: a.update(p=a["p"].long()), "p: dtype int64"),
    ],
)
def test_bad_arguments_name_the_argument(change, message):
    _, p, (s1, s2, a1, a2) = _setup((3, 300), torch.float32, seed=5)
    args = dict(p=p, g=torch.zeros_like(p), state1=s1, state2=s2, absmax1=a1, absmax2=a2, qmap1=_maps()[0],
                qmap2=_maps()[1], **HYPER, step=1)
    change(args)
    with pytest.raises((TypeError, ValueError), match=message):
        A.adamw8bit_update(**args)


def test_doctor_rows_pass_on_cpu():
    from npu_ft import doctor

    checks = [doctor.Check(**spec) for spec in A.doctor_checks()]
    assert {c.dtype for c in checks} == {torch.float32, torch.bfloat16}
    for check in checks:
        result = doctor.run_check(check, torch.device("cpu"))
        assert result.passed, result
        assert result.kernel == "cpu"


def test_doctor_row_fails_on_a_wrong_kernel(monkeypatch):
    from npu_ft import doctor

    real = A.adamw8bit_update

    def drifting(p, g, *args, **kwargs):  # a kernel that forgets part of the gradient
        real(p, g * 0.9, *args, **kwargs)

    monkeypatch.setattr(A, "adamw8bit_update", drifting)
    result = doctor.run_check(doctor.Check(**A.doctor_checks((torch.float32,))[0]), torch.device("cpu"))
    assert not result.passed


# -- Triton (cuda backend) -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 300), (2, 257, 9)])
def test_triton_kernel_within_one_code_of_reference(shape, dtype):
    pytest.importorskip("triton")
    from npu_ft.ops.backends.cuda import adamw8bit as K

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen, p_ref, ref_states = _setup(shape, dtype, seed=6)
    for step in range(1, 6):
        g = _grad(gen, p_ref, step)
        p, states = p_ref.clone().to(device), [s.clone().to(device) for s in ref_states]
        K.adamw8bit_update(p, g.to(device), *states, *_maps(device), **HYPER, step=step)
        _reference(p_ref, g, *ref_states, *_maps(), **HYPER, step=step)
        for i in (0, 1):
            off = (states[i].cpu().int() - ref_states[i].int()).abs().max()
            assert off <= 1, f"state{i + 1}: a code {off} away from the reference's (step {step})"
            torch.testing.assert_close(states[i + 2].cpu(), ref_states[i + 2], rtol=1e-6, atol=0)
        _registry.tolerance("adamw8bit_update", dtype).assert_close(p.cpu(), p_ref)


# -- npu (the test suite's fake npu device) --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_npu_kernel_is_bit_identical_to_reference(fake_npu, dtype):  # noqa: F811
    assert "npu" in _registry.REGISTERED["adamw8bit_update"]
    reset_kernel_calls()
    got = _run(A.adamw8bit_update, (2, 257, 9), dtype, device=fake_npu)
    calls = kernel_calls("adamw8bit_update")
    assert calls.get("npu") == STEPS and "reference" not in calls, calls
    # the 8-bit (de)quantization inside ran on the npu kernels of the blockwise ops
    assert kernel_calls("quantize_blockwise_8bit").get("npu", 0) >= 2 * STEPS
    _assert_same(got, _run(_reference, (2, 257, 9), dtype), f"npu {dtype}")


def test_opcheck_on_npu(fake_npu):  # noqa: F811
    gen, p, states = _setup((3, 300), torch.float32, seed=7, device=fake_npu)
    g = torch.randn(p.shape, generator=gen).to(fake_npu)
    args = (p, g, *states, *_maps(fake_npu), 1e-3, 0.9, 0.999, 1e-8, 0.01, 2)
    torch.library.opcheck(torch.ops.npu_ft.adamw8bit_update.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
