"""Where a step's time goes (npu_ft.bench.step_profile) and bench/profile_case.py --kinds."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from npu_ft.bench.step_profile import KINDS, event_kind, fusion_ceiling, kinds_table, time_by_kind

ROOT = Path(__file__).resolve().parents[2]


def _event(name, parent=None, self_us=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, self_cpu_time_total=self_us)


@pytest.mark.parametrize("chain, kind", [
    (["aten::mm"], "gemm"),
    (["aten::mm", "npu_ft::lora_linear"], "gemm"),
    (["aten::mul_", "npu_ft::lora_linear"], "linear ops"),
    (["aten::mm", "_LinearCrossEntropySum"], "loss"),
    (["aten::exp_", "_LinearCrossEntropySum"], "loss"),
    (["aten::mul_", "Optimizer.step#AdamW.step"], "optimizer"),
    (["aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention"], "attention"),
    (["aten::mul", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
      "ScaledDotProductFlashAttentionForCpuBackward0",
      "autograd::engine::evaluate_function: ScaledDotProductFlashAttentionForCpuBackward0"], "attention"),
    # a checkpointed layer's forward rerun inside the backward node that first unpacks one of its tensors
    (["aten::pow", "GeneratedBackwardFor_npu_ft_lora_linear_default",
      "autograd::engine::evaluate_function: GeneratedBackwardFor_npu_ft_lora_linear_default"], "other"),
    (["npu_ft_cpu::rope", "npu_ft::rope", "GeneratedBackwardFor_npu_ft_lora_linear_default"], "block ops"),
    (["npu_ft_cpu::rms_norm", "npu_ft::rms_norm"], "block ops"),
    (["aten::empty", "npu_ft::swiglu_backward",
      "autograd::engine::evaluate_function: GeneratedBackwardFor_npu_ft_swiglu_default"], "block ops"),
    (["aten::pow"], "other"),
    (["aten::mul", "autograd::engine::evaluate_function: MulBackward0"], "other"),
])
def test_event_kind_reads_the_op_and_its_ancestors(chain, kind):
    parent = None
    for name in reversed(chain):  # outermost first
        parent = _event(name, parent)
    assert event_kind(parent) == kind


def test_time_by_kind_sums_self_time_and_the_ceiling_follows_amdahl():
    events = [_event("aten::mm", self_us=6e6), _event("aten::pow", self_us=1e6),
              _event("npu_ft::rope", self_us=1e6)]
    seconds = time_by_kind(events)
    assert set(seconds) == set(KINDS)
    assert seconds["gemm"] == 6.0 and seconds["other"] == 1.0 and seconds["block ops"] == 1.0
    # 10 s steps of which 2 s could go at most: 10 / 8
    assert fusion_ceiling(10.0, seconds) == pytest.approx(1.25)
    assert "1.250x" in kinds_table({"case": (10.0, seconds)})
    with pytest.raises(ValueError, match="not within"):
        fusion_ceiling(1.5, seconds)


@pytest.mark.parametrize("case", ["lora/npu-ft", "full/npu-ft"])
def test_profile_case_kinds_on_a_tiny_model(case, capsys, monkeypatch):
    """The script profiles a real step: every kind a LoRA/full step has gets time, and the table prints."""
    monkeypatch.setattr(sys, "argv", ["profile_case.py", str(ROOT / "bench/suites/smoke.yaml"), case, "--kinds"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "bench/profile_case.py"), run_name="__main__")
    assert done.value.code == 0
    table = capsys.readouterr().out.splitlines()
    (row,) = [line for line in table if line.startswith(f"| tiny/{case}")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    shares = dict(zip(KINDS, (float(c.rstrip(" %")) for c in cells[2:2 + len(KINDS)]), strict=True))
    for kind in ("gemm", "loss", "optimizer", "block ops"):
        assert shares[kind] > 0, (kind, row)
    assert sum(shares.values()) <= 100.0 + 1e-6
    assert float(cells[-1].rstrip("x")) > 1.0
