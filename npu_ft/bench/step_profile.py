"""Where a training step's time goes, by kind of op, and what fusing its elementwise ops could gain.

A torch.profiler trace of whole steps (forward, backward, optimizer) is summed by *self* time (the time
spent in an op itself, not in the ops it calls), each op put in one kind (:func:`event_kind`) from its
own name and the names of the ops above it (autograd nodes and record_function ranges above it count
only for the optimizer and the loss: a checkpointed layer's forward is rerun inside whichever backward
node first unpacks one of its tensors):

* ``optimizer``: anything under ``Optimizer.step`` / ``Optimizer.zero_grad``;
* ``loss``: anything under the fused linear cross-entropy (its GEMMs included) or transformers' loss;
* ``gemm``: matrix products (``aten::mm``, ``addmm``, ``bmm``, ...), wherever they run;
* ``linear ops``: the rest of npu-ft's linear ops (``npu_ft::lora_linear``, ``nf4_linear``, the LoRA
  family's, forward and backward): LoRA's scaling, reshapes, NF4 dequantisation;
* ``attention``: the attention kernels and their backward;
* ``block ops``: npu-ft's fused decoder-block ops (``npu_ft::rms_norm`` / ``rope`` / ``swiglu``, forward
  and backward) and what they call;
* ``other``: the rest: transformers' elementwise chains (RMSNorm's pow/mean/rsqrt/mul, RoPE's
  cat/mul/add, SiLU and the product), residual adds, copies, the embedding, autograd's own overhead.

:func:`fusion_ceiling` turns that into the most any fusion of the decoder's elementwise ops can speed a
step up: even if ``block ops`` and ``other`` took no time at all, the GEMMs, npu-ft's linear ops,
attention, loss and optimizer remain (Amdahl's law).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

KINDS = ("gemm", "linear ops", "attention", "loss", "optimizer", "block ops", "other")

#: ``self`` time of these ops is matrix-product time
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_int_mm",
                      "aten::addbmm", "aten::mv", "aten::dot"})

#: substrings of an op's or an ancestor's name that put it in a kind, checked in this order
_BY_ANCESTOR = (
    ("optimizer", ("Optimizer.step", "Optimizer.zero_grad")),
    ("loss", ("LinearCrossEntropy", "linear_cross_entropy", "cross_entropy", "nll_loss", "NllLoss",
              "log_softmax", "LogSoftmax")),
)
_LINEAR_OPS = ("lora_linear", "nf4_linear", "dora_", "lora_fa_", "vera_", "nf4_dequantize", "dequantize_nf4")
_ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "npu_fusion_attention")
_BLOCK_OPS = ("npu_ft::rms_norm", "npu_ft::rope", "npu_ft::swiglu", "npu_ft_cpu::rms_norm", "npu_ft_cpu::rope",
              "npu_ft_cpu::swiglu")


def _lineage(event: Any) -> list[str]:
    """The event's name and those of the events above it (innermost first)."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def event_kind(event: Any) -> str:
    """The kind (one of :data:`KINDS`) of a profiler ``FunctionEvent``, see the module docstring."""
    names = _lineage(event)
    for kind, needles in _BY_ANCESTOR:
        if any(needle in name for name in names for needle in needles):
            return kind
    if event.name in GEMM_OPS:
        return "gemm"
    # by the ops above it only, not the autograd nodes: a checkpointed layer's forward is rerun inside
    # the backward node that first needs one of its tensors, which is not where that work belongs
    ops = [name for name in names if _is_op(name)]
    for kind, needles in (("linear ops", _LINEAR_OPS), ("attention", _ATTENTION), ("block ops", _BLOCK_OPS)):
        if any(needle in name for name in ops for needle in needles):
            return kind
    return "other"


def _is_op(name: str) -> bool:
    """An operator's profiler name (``aten::mm``, ``npu_ft::rms_norm_backward``), not an autograd node's
    (``autograd::engine::evaluate_function: ...``, ``GeneratedBackwardFor_...``, ``MulBackward0``)."""
    return "::" in name and not name.startswith("autograd::")


def time_by_kind(events: Iterable[Any]) -> dict[str, float]:
    """Seconds of self time per kind (all of :data:`KINDS`, zero where none ran) over profiler
    ``events`` (``prof.events()``: FunctionEvents with ``name``, ``cpu_parent``, ``self_cpu_time_total``
    in microseconds)."""
    seconds = dict.fromkeys(KINDS, 0.0)
    for event in events:
        seconds[event_kind(event)] += event.self_cpu_time_total / 1e6
    return seconds


def fusion_ceiling(wall_s: float, seconds: dict[str, float]) -> float:
    """The largest speed-up (old / new step time) that removing all ``block ops`` and ``other`` time
    from steps that took ``wall_s`` seconds could give: ``wall_s / (wall_s - removable)``."""
    removable = seconds["block ops"] + seconds["other"]
    if not 0 <= removable < wall_s:
        raise ValueError(f"removable op time {removable:.3f} s is not within the steps' {wall_s:.3f} s")
    return wall_s / (wall_s - removable)


def kinds_table(rows: dict[str, tuple[float, dict[str, float]]]) -> str:
    """A markdown table: per label (``{label: (wall seconds per step, seconds per kind per step)}``) the
    share of the step per kind and :func:`fusion_ceiling`."""
    head = "| case | step s | " + " | ".join(KINDS) + " | ceiling |"
    lines = [head, "|" + "---|" * (len(KINDS) + 3)]
    for label, (wall_s, seconds) in rows.items():
        shares = " | ".join(f"{100 * seconds[k] / wall_s:.1f} %" for k in KINDS)
        lines.append(f"| {label} | {wall_s:.2f} | {shares} | {fusion_ceiling(wall_s, seconds):.3f}x |")
    return "\n".join(lines)
