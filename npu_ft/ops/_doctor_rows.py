"""What ``npu-ft doctor``'s rows share (inputs, forward + backward comparison, the NF4 base) and the
LoRA family's rows (``doctor_checks()`` of :mod:`npu_ft.ops.dora` and :mod:`npu_ft.ops.lora_fa`).
Rows are keyword arguments of ``npu_ft.doctor.Check``: this module does not import the doctor (which
imports it). Imported only when doctor runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: the linear checks' shapes: odd out/in (numel 8643 is not a multiple of any blocksize), rank, NF4 blocksize
W_SHAPE = (67, 129)
X_SHAPE = (3, 37, 129)
RANK = 5
BLOCKSIZE = 64


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def linear_inputs(seed: int) -> dict[str, torch.Tensor]:
    """x ``X_SHAPE``, weight ``W_SHAPE``, bias, lora_A ``[RANK, in]``, lora_B ``[out, RANK]``, grad of y (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": rand(gen, *X_SHAPE),
        "weight": rand(gen, *W_SHAPE) / 10,
        "bias": rand(gen, W_SHAPE[0]),
        "lora_A": rand(gen, RANK, W_SHAPE[1]) / 10,
        "lora_B": rand(gen, W_SHAPE[0], RANK) / 10,
        "grad": rand(gen, *X_SHAPE[:-1], W_SHAPE[0]),
    }


def grads(fn: Callable, leaves: dict, grad: torch.Tensor) -> dict:
    """Forward ``fn(**leaves)``, backward with ``grad``; returns output and every leaf's gradient."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in leaves.items()}
    out = fn(**leaves)
    out.backward(grad.to(out.dtype))
    return {"y": out.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}


def compare_grads(device, dtype, op_fn: Callable, ref_fn: Callable, trainable: dict, fixed: dict, grad) -> dict:
    """``{name: (result on the CPU, reference)}`` for y and every trainable gradient: ``op_fn`` on the device
    in ``dtype`` against ``ref_fn`` in fp32 on the CPU."""
    def on(t):
        return t.to(device=device, dtype=dtype)

    ref = grads(lambda **kw: ref_fn(**kw, **fixed), trainable, grad)
    fixed_dev = {k: (on(v) if isinstance(v, torch.Tensor) else v) for k, v in fixed.items()}
    res = grads(lambda **kw: op_fn(**kw, **fixed_dev), {k: on(v) for k, v in trainable.items()}, on(grad))
    return {name: (res[name].cpu(), ref[name]) for name in ref}


def nf4_base(weight: torch.Tensor, device) -> tuple:
    """``(packed, state, dense fp32 [out, in], packed on device, state on device)`` of ``weight``."""
    from .nf4 import dequantize_nf4, quantize_nf4

    packed, state = quantize_nf4(weight, blocksize=BLOCKSIZE, double_quant=True)
    return packed, state, dequantize_nf4(packed, state, torch.float32), packed.to(device), state.to(device)


def compare(device, dtype, op_fn: Callable, ref_fn: Callable, inputs: dict, trainable: tuple[str, ...],
            fixed: dict) -> dict:
    """Forward + backward of ``op_fn`` on the device against ``ref_fn`` in fp32 on the CPU."""
    return compare_grads(device, dtype, op_fn, ref_fn, trainable={k: inputs[k] for k in trainable}, fixed=fixed,
                         grad=inputs["grad"])


def rows(dtypes, dense: tuple[str, Callable, tuple[str, ...]], nf4: tuple[str, Callable, tuple[str, ...]]
         ) -> list[dict[str, Any]]:
    """Rows ``(op name, run fn, kernel ops)`` for the dense and the NF4 variant, per dtype, as keyword
    arguments of ``npu_ft.doctor.Check``; compared with the op registry's tolerance of the backward op
    (``kernel ops[1]``)."""
    w, x = "x".join(map(str, W_SHAPE)), "x".join(map(str, X_SHAPE))
    checks = []
    for dtype in dtypes:
        for (name, run, kernel_ops), suffix in ((dense, ""), (nf4, " dq")):
            checks.append(dict(op=f"{name} fwd+bwd", dtype=dtype, shape=f"x {x} W {w} r{RANK}{suffix}", run=run,
                               kernel_ops=kernel_ops, tolerance_op=kernel_ops[1]))
    return checks
