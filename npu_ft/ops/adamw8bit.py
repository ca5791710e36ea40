"""The fused 8-bit AdamW update (bitsandbytes' blockwise 8-bit optimizer step), one parameter at a time.

State layout (bitsandbytes 0.50 ``AdamW8bit``, so an optimizer state dict reads the same):

* ``state1`` uint8, shaped like the parameter: the first moment ``m``, 8-bit blockwise codes in the
  **signed** dynamic map ``qmap1`` (:func:`signed_dynamic_map`, float32 [256]).
* ``state2`` uint8, shaped like the parameter: the second moment ``v``, codes in the **unsigned**
  dynamic map ``qmap2`` (:func:`unsigned_dynamic_map`).
* ``absmax1`` / ``absmax2`` float32 ``[ceil(numel / 256)]``: each block's largest ``|m|`` / ``v``.
  The block size of optimizer states is fixed at :data:`STATE_BLOCKSIZE` = 256, as in bitsandbytes.

One step (op ``adamw8bit_update``), in bitsandbytes' CPU order of operations, all in float32::

    m = dequant(state1) * beta1 + (1 - beta1) * g            v = dequant(state2) * beta2 + (1 - beta2) * g * g
    p = p * (1 - lr * weight_decay)            (only when weight_decay > 0)
    p = p + (-lr / (1 - beta1**step)) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
    state1, absmax1 = quant(m);  state2, absmax2 = quant(v)          (new absmax from the updated m, v)

``p`` may be float32, bfloat16 or float16 (computed in float32, rounded once at the end); ``g`` any
float dtype of ``p``'s shape. Quantization is npu-ft's blockwise 8-bit op (bitsandbytes' CPU lookup
table), so on the CPU the states are byte-identical to ``bitsandbytes.optim.AdamW8bit``'s.

Kernels: the reference below (whole tensor, pure torch); ``backends/cpu`` and ``backends/npu``
run :func:`adamw8bit_update_chunked` (the same arithmetic on slices of whole blocks, the
quantization through the ``quantize_blockwise_8bit`` / ``dequantize_blockwise_8bit`` ops, so
temporaries stay small); ``backends/cuda`` one fused Triton kernel.
"""

from __future__ import annotations

import math

import torch

from . import _checks, _registry
from . import nf4 as _nf4

__all__ = [
    "STATE_BLOCKSIZE",
    "adamw8bit_update",
    "adamw8bit_update_chunked",
    "adamw8bit_update_reference",
    "doctor_checks",
    "signed_dynamic_map",
    "state_blocks",
    "unsigned_dynamic_map",
]

#: block size of 8-bit optimizer states (bitsandbytes' fixed choice for its blockwise optimizers)
STATE_BLOCKSIZE = 256

ADAMW8BIT_UPDATE = _registry.define(
    "adamw8bit_update(Tensor(a!) p, Tensor g, Tensor(b!) state1, Tensor(c!) state2, Tensor(d!) absmax1, "
    "Tensor(e!) absmax2, Tensor qmap1, Tensor qmap2, float lr, float beta1, float beta2, float eps, "
    "float weight_decay, int step) -> ()",
    # the parameter after a step (computed in float32, rounded once): kernels whose float order
    # differs stay within these; the states' codes are checked apart (at most one code off)
    tolerances={
        torch.float32: _registry.Tolerance(1e-6, 1e-6),
        torch.bfloat16: _registry.Tolerance(2**-7, 0.0),  # one bf16 ulp
        torch.float16: _registry.Tolerance(2**-10, 0.0),  # one fp16 ulp
    },
)


def _adamw8bit_update_fake(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps,
                           weight_decay, step) -> None:
    return None


_registry.register_fake(ADAMW8BIT_UPDATE, _adamw8bit_update_fake)


# --------------------------------------------------------------------------------------------------
# code maps
# --------------------------------------------------------------------------------------------------


def signed_dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)``: float32 [256], ascending (the map of ``m``)."""
    return _nf4.dynamic_code_8bit(device)


def unsigned_dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=False)``: float32 [256] in [0, 1], ascending (the map of ``v``).

    Cached per device: do not modify the returned tensor in place (clone it first).
    """
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        return _nf4._cached(("udynamic8", device), lambda: unsigned_dynamic_map("cpu").to(device))
    return _nf4._cached(("udynamic8", device), lambda: _nf4._build_dynamic_code(signed=False))


def state_blocks(numel: int) -> int:
    """Number of absmax entries of an 8-bit state of ``numel`` elements."""
    return (numel + STATE_BLOCKSIZE - 1) // STATE_BLOCKSIZE


# --------------------------------------------------------------------------------------------------
# the step, shared by the reference and the chunked kernels
# --------------------------------------------------------------------------------------------------


def _adam_moments_and_param(p32, grad, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """In place on float32 ``m``, ``v`` and ``p32`` (same shape): bitsandbytes' CPU AdamW arithmetic."""
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    denom = (v.sqrt() / correction2).add_(eps)
    if weight_decay > 0.0:
        p32.mul_(1.0 - lr * weight_decay)
    p32.addcdiv_(m, denom, value=-lr / correction1)


def adamw8bit_update_reference(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps,
                               weight_decay, step) -> None:
    """One AdamW step on ``p`` with 8-bit states, in place (see the module docstring). Whole tensors."""
    f32 = torch.float32
    m = _nf4.dequantize_blockwise_8bit_reference(state1, absmax1, qmap1, STATE_BLOCKSIZE, f32)
    v = _nf4.dequantize_blockwise_8bit_reference(state2, absmax2, qmap2, STATE_BLOCKSIZE, f32)
    p32 = p.float()  # float32 p: the same tensor, updated in place (as bitsandbytes does)
    _adam_moments_and_param(p32, g.float(), m, v, lr, beta1, beta2, eps, weight_decay, step)
    if p32 is not p:
        p.copy_(p32)
    for state, absmax, values, qmap in ((state1, absmax1, m, qmap1), (state2, absmax2, v, qmap2)):
        q, new_absmax = _nf4.quantize_blockwise_8bit_reference(values, qmap, STATE_BLOCKSIZE)
        state.copy_(q)
        absmax.copy_(new_absmax)


def adamw8bit_update_chunked(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps,
                             weight_decay, step, chunk_blocks: int = 4096) -> None:
    """:func:`adamw8bit_update_reference` on slices of ``chunk_blocks`` whole blocks at a time.

    Float temporaries are bounded by the chunk (``chunk_blocks * 256`` elements) instead of the
    parameter; (de)quantization goes through the ``npu_ft`` blockwise 8-bit ops, so each device
    uses its own kernels for them. Every element sees the same float operations as in the
    reference. ``p``, ``g`` and the states must be contiguous.
    """
    f32 = torch.float32
    flat_p, flat_g = p.view(-1), g.reshape(-1)
    flat_s1, flat_s2 = state1.view(-1), state2.view(-1)
    n = flat_p.numel()
    step_elems = chunk_blocks * STATE_BLOCKSIZE
    quantize = torch.ops.npu_ft.quantize_blockwise_8bit
    dequantize = torch.ops.npu_ft.dequantize_blockwise_8bit
    for start in range(0, n, step_elems):
        end = min(start + step_elems, n)
        b0, b1 = start // STATE_BLOCKSIZE, state_blocks(end)
        m = dequantize(flat_s1[start:end], absmax1[b0:b1], qmap1, STATE_BLOCKSIZE, f32)
        v = dequantize(flat_s2[start:end], absmax2[b0:b1], qmap2, STATE_BLOCKSIZE, f32)
        p_chunk = flat_p[start:end]
        p32 = p_chunk.float()
        _adam_moments_and_param(p32, flat_g[start:end].float(), m, v, lr, beta1, beta2, eps, weight_decay, step)
        if p32 is not p_chunk:
            p_chunk.copy_(p32)
        for flat_state, absmax, values, qmap in ((flat_s1, absmax1, m, qmap1), (flat_s2, absmax2, v, qmap2)):
            q, new_absmax = quantize(values, qmap, STATE_BLOCKSIZE)
            flat_state[start:end].copy_(q)
            absmax[b0:b1].copy_(new_absmax)


_registry.register_reference(ADAMW8BIT_UPDATE, adamw8bit_update_reference)


# --------------------------------------------------------------------------------------------------
# Python entry point
# --------------------------------------------------------------------------------------------------


def _check_number(name: str, value, low: float, high: float | None = None, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or value < low or too_high:
        bound = "" if high is None else (f", < {high}" if high_open else f", <= {high}")
        raise ValueError(f"{name}: {value} out of range (expected >= {low}{bound})")
    return value


def _check_state(name: str, state: torch.Tensor, p: torch.Tensor) -> None:
    _checks.check_tensor(name, state, dtypes=(torch.uint8,))
    if state.numel() != p.numel():
        raise ValueError(f"{name}: has {state.numel()} elements, the parameter {p.numel()}")
    if not state.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (it is updated in place)")


def _check_absmax(name: str, absmax: torch.Tensor, p: torch.Tensor) -> None:
    _checks.check_tensor(name, absmax, dtypes=(torch.float32,), ndim=1)
    _checks.check_dim(name, absmax.numel(), state_blocks(p.numel()), f"one per block of {STATE_BLOCKSIZE}: size")
    if not absmax.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (it is updated in place)")


def adamw8bit_update(
    p: torch.Tensor,
    g: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """One 8-bit AdamW step, in place on ``p``, ``state1``, ``state2``, ``absmax1``, ``absmax2``.

    ``p`` float32/bfloat16/float16, contiguous, any shape with numel >= 1; ``g`` a float tensor of
    ``p``'s shape; ``state1``/``state2`` uint8 with ``p.numel()`` elements; ``absmax1``/``absmax2``
    float32 ``[ceil(numel / 256)]``; ``qmap1``/``qmap2`` float32 [256] (signed / unsigned dynamic
    maps); ``step`` >= 1 counts this step. All tensors on one device.
    """
    _checks.check_tensor("p", p, dtypes=_checks.FLOAT_DTYPES)
    if p.numel() == 0:
        raise ValueError("p: must have at least one element")
    if not p.is_contiguous():
        raise ValueError("p: must be contiguous (it is updated in place)")
    _checks.check_tensor("g", g, dtypes=_checks.FLOAT_DTYPES)
    if g.shape != p.shape:
        raise ValueError(f"g: shape {tuple(g.shape)} differs from p's {tuple(p.shape)}")
    _check_state("state1", state1, p)
    _check_state("state2", state2, p)
    _check_absmax("absmax1", absmax1, p)
    _check_absmax("absmax2", absmax2, p)
    for name, qmap in (("qmap1", qmap1), ("qmap2", qmap2)):
        _checks.check_tensor(name, qmap, dtypes=(torch.float32,), ndim=1)
        _checks.check_dim(name, qmap.numel(), 256, "size")
    _checks.check_same_device(
        "p", p, g=g, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2, qmap1=qmap1, qmap2=qmap2
    )
    lr = _check_number("lr", lr, 0.0)
    beta1 = _check_number("beta1", beta1, 0.0, 1.0, high_open=True)
    beta2 = _check_number("beta2", beta2, 0.0, 1.0, high_open=True)
    eps = _check_number("eps", eps, 0.0)
    weight_decay = _check_number("weight_decay", weight_decay, 0.0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step: expected an int >= 1, got {step!r}")
    torch.ops.npu_ft.adamw8bit_update(
        p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps, weight_decay, step
    )


# --------------------------------------------------------------------------------------------------
# npu-ft doctor
# --------------------------------------------------------------------------------------------------

#: doctor input: 3 full blocks and a partial one, and a zero block (a row that got no gradient)
_DOCTOR_NUMEL = 3 * STATE_BLOCKSIZE + 77
_DOCTOR_STEPS = 3


def _doctor_case(device: torch.device, dtype: torch.dtype) -> dict:
    """Three steps in ``dtype``: each one on ``device`` from the reference's previous state, against
    the reference's step on the CPU (so a step's difference does not carry into the next).

    Returns doctor pairs: the parameter after each step, and per state the count of codes that
    differ from the reference's by more than one (0 passes: a kernel whose float order differs may
    round a value on a code boundary to the neighbouring code, never further).
    """
    gen = torch.Generator().manual_seed(5)
    p_ref = torch.randn(_DOCTOR_NUMEL, generator=gen).to(dtype)
    blocks = state_blocks(_DOCTOR_NUMEL)
    ref = (torch.zeros(_DOCTOR_NUMEL, dtype=torch.uint8), torch.zeros(_DOCTOR_NUMEL, dtype=torch.uint8),
           torch.zeros(blocks), torch.zeros(blocks))
    maps = (signed_dynamic_map(), unsigned_dynamic_map())
    dev_maps = (signed_dynamic_map(device), unsigned_dynamic_map(device))
    lr, beta1, beta2, eps, weight_decay = 1e-2, 0.9, 0.999, 1e-8, 0.01
    params, ref_params, beyond_one = [], [], torch.zeros(2)
    for step in range(1, _DOCTOR_STEPS + 1):
        grad = torch.randn(_DOCTOR_NUMEL, generator=gen).to(dtype)
        grad[STATE_BLOCKSIZE : 2 * STATE_BLOCKSIZE] = 0
        p = p_ref.clone().to(device)
        s1, s2, a1, a2 = (t.clone().to(device) for t in ref)
        adamw8bit_update(p, grad.to(device), s1, s2, a1, a2, dev_maps[0], dev_maps[1], lr=lr, beta1=beta1,
                         beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
        adamw8bit_update_reference(p_ref, grad, *ref, *maps, lr, beta1, beta2, eps, weight_decay, step)
        params.append(p.cpu())
        ref_params.append(p_ref.clone())
        for i, got in enumerate((s1, s2)):
            beyond_one[i] += ((got.cpu().to(torch.int16) - ref[i].to(torch.int16)).abs() > 1).sum()
    return {
        "param": (torch.stack(params), torch.stack(ref_params)),
        "state1 codes >1 off": (beyond_one[:1], torch.zeros(1)),
        "state2 codes >1 off": (beyond_one[1:], torch.zeros(1)),
    }


def doctor_checks(dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    """``npu-ft doctor`` rows for ``adamw8bit_update``, one per dtype (see :func:`_doctor_case`), as
    keyword arguments of ``npu_ft.doctor.Check`` (this module does not import the doctor)."""
    return [
        dict(op="adamw8bit_update x3", dtype=dtype, shape=f"{_DOCTOR_NUMEL} bs{STATE_BLOCKSIZE}", run=_doctor_case,
             kernel_ops=(ADAMW8BIT_UPDATE,), tolerance_op=ADAMW8BIT_UPDATE)
        for dtype in dtypes
    ]
