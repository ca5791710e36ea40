"""Model FLOPs of a training step, the GEMM peak of the device, and MFU.

Model FLOPs (what a step must compute; recomputation from checkpointing is not counted), for a
step of ``T`` positions in rows of ``S`` tokens, ``H`` positions through the output head, per decoder
linear of ``in x out`` weights and LoRA rank ``r``:

* forward: ``2 T in out`` per linear, ``2 T r (in + out)`` per LoRA adapter, attention
  ``4 T S q_dim`` (scores and weighted sum, no causal discount, as the kernels compute them), head
  ``2 H hidden vocab``;
* backward, input gradients (every method): the same again for every linear, adapter and the head,
  attention ``8 T S q_dim`` (dQ, dK, dV, d(scores));
* backward, weight gradients (what the method trains): full: ``2 T in out`` per linear and
  ``2 H hidden vocab`` for the (tied) head; LoRA/QLoRA: ``2 T r (in + out)`` per adapter only.

Norms, RoPE, activations and the softmax are not counted (not GEMMs). QLoRA counts as LoRA (the
dequantisation is not a FLOP of the model). ``tests/bench/test_flops.py`` checks the formula
against ``torch.utils.flop_counter`` on a tiny model.

The GEMM peak is measured in the case's own process, after training, on the model's own linear
shapes (``[T, in] @ [in, out]`` in the case's dtype, best of a few runs): MFU is the step's model
FLOP/s over that, i.e. how close the step comes to what this device's GEMMs do at these shapes.
Where a published dense peak is known for the device it is reported beside it (:data:`SPEC_TFLOPS`).
"""

from __future__ import annotations

import time
from typing import Any

from npu_ft.launch.estimate import LINEAR_NAMES

__all__ = ["SPEC_TFLOPS", "gemm_peak_flops", "spec_tflops", "step_flops"]

#: published dense peak TFLOPS per dtype (vendor spec sheets / public reports; not measured here).
#: Matched by substring of the device name, first match wins.
SPEC_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("910B3", {"bfloat16": 313.0, "float16": 313.0}),
    ("910B4", {"bfloat16": 280.0, "float16": 280.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
]


def spec_tflops(device_name: str, dtype: str) -> float | None:
    """The published dense peak of ``device_name`` in ``dtype`` (TFLOPS), or None when unknown."""
    for key, table in SPEC_TFLOPS:
        if key.lower() in (device_name or "").lower():
            return table.get(dtype)
    return None


def step_flops(shape: Any, method: str, positions: int, row_len: int, head_positions: int,
               lora_rank: int = 0, lora_targets: tuple[str, ...] | list[str] = LINEAR_NAMES) -> dict[str, float]:
    """Model FLOPs of one training step, by part (see the module docstring).

    ``shape``: :class:`npu_ft.launch.estimate.ModelShape`; ``positions`` T = batch x row length;
    ``row_len`` S; ``head_positions`` H (positions whose logits the loss needs); ``lora_targets``:
    the linears of a layer that carry an adapter (names of :data:`~npu_ft.launch.estimate.LINEAR_NAMES`).
    """
    linears = shape.linear_shapes()
    gemm = sum(a * b for a, b in linears)
    head = shape.hidden * shape.vocab
    t, h_pos = positions, head_positions
    fwd = shape.layers * (2 * t * gemm + 4 * t * row_len * shape.q_dim) + 2 * h_pos * head
    bwd_input = shape.layers * (2 * t * gemm + 8 * t * row_len * shape.q_dim) + 2 * h_pos * head
    if method == "full":
        bwd_weight = shape.layers * 2 * t * gemm + 2 * h_pos * head
        adapters = 0.0
    elif method in ("lora", "qlora"):
        bwd_weight = 0.0
        adapters = 2 * t * shape.lora_params(lora_rank, lora_targets)  # forward; input and weight gradients below
        bwd_input += adapters
        bwd_weight += adapters
        fwd += adapters
    else:
        raise ValueError(f"method must be lora, qlora or full, got {method!r}")
    return {"forward": float(fwd), "backward_input": float(bwd_input), "backward_weight": float(bwd_weight),
            "total": float(fwd + bwd_input + bwd_weight)}


def gemm_peak_flops(shape: Any, positions: int, dtype: Any, device: Any, synchronize=lambda: None,
                    repeats: int = 3, min_seconds: float = 0.05, max_repeats: int = 200) -> float:
    """FLOP/s of this device's GEMMs at the model's linear shapes: ``[positions, in] @ [in, out]`` for
    every distinct (in, out) of a decoder layer, each the best of at least ``repeats`` timed runs
    (more, up to ``max_repeats``, until they took ``min_seconds``: small shapes) after one untimed;
    total FLOPs over the total of the best times."""
    import torch

    total_flops = total_s = 0.0
    g = torch.Generator(device="cpu").manual_seed(0)
    for k, n in sorted(set(shape.linear_shapes())):
        a = torch.randn(positions, k, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
        best, spent, i = float("inf"), 0.0, 0
        while i <= repeats or (spent < min_seconds and i <= max_repeats):
            synchronize()
            t0 = time.perf_counter()
            torch.mm(a, b)
            synchronize()
            took = time.perf_counter() - t0
            if i:
                best, spent = min(best, took), spent + took
            i += 1
        total_flops += 2.0 * positions * k * n
        total_s += best
        del a, b
    return total_flops / total_s
