"""Shared pieces of the LoRA family's ``npu-ft doctor`` rows (``doctor_checks()`` of
:mod:`npu_ft.ops.dora` and :mod:`npu_ft.ops.lora_fa`): inputs, the NF4 base, the row table.
Imported only when doctor runs."""

from __future__ import annotations

from collections.abc import Callable

import torch


def nf4_base(weight: torch.Tensor, device) -> tuple:
    """``(packed, state, dense fp32 [out, in], packed on device, state on device)`` of ``weight``."""
    from npu_ft import doctor

    from .nf4 import dequantize_nf4, quantize_nf4

    packed, state = quantize_nf4(weight, blocksize=doctor._BLOCKSIZE, double_quant=True)
    return packed, state, dequantize_nf4(packed, state, torch.float32), packed.to(device), state.to(device)


def compare(device, dtype, op_fn: Callable, ref_fn: Callable, inputs: dict, trainable: tuple[str, ...],
            fixed: dict):
    """Forward + backward of ``op_fn`` on the device against ``ref_fn`` in fp32 on the CPU."""
    from npu_ft import doctor

    return doctor._compare_grads(device, dtype, op_fn, ref_fn, trainable={k: inputs[k] for k in trainable},
                                 fixed=fixed, grad=inputs["grad"])


def rows(dtypes, dense: tuple[str, Callable, tuple[str, ...]], nf4: tuple[str, Callable, tuple[str, ...]]) -> list:
    """``doctor.Check`` rows: ``(op name, run fn, kernel ops)`` for the dense and the NF4 variant, per dtype;
    compared with the op registry's tolerance of the backward op (``kernel ops[1]``)."""
    from npu_ft import doctor

    w, x = "x".join(map(str, doctor._W_SHAPE)), "x".join(map(str, doctor._X_SHAPE))
    checks = []
    for dtype in dtypes:
        for (name, run, kernel_ops), suffix in ((dense, ""), (nf4, " dq")):
            checks.append(doctor.Check(f"{name} fwd+bwd", dtype, f"x {x} W {w} r{doctor._RANK}{suffix}", run,
                                       kernel_ops, kernel_ops[1]))
    return checks
