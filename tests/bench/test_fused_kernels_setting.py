"""The bench's ``fused_kernels`` case setting: how suites give it, what it does to case ids and parity
groups, and that the npu-ft implementation applies (or leaves out) the fused decoder-block ops."""

from __future__ import annotations

import re

import pytest
import torch

from npu_ft.bench.suite import BenchCase, SuiteError, parse_suite

SUITE = {"models": ["tiny"], "methods": ["lora"], "implementations": ["npu-ft", "reference"], "devices": ["cpu"],
         "gradient_checkpointing": True}


def _ids(suite) -> dict[tuple[str, str], bool]:
    return {(c.implementation, c.case_id): c.fused_kernels for c in suite.cases}


def test_default_is_on_and_leaves_case_ids_as_they_were():
    suite = parse_suite(SUITE, "s.yaml", check_devices=False)
    assert all(c.fused_kernels for c in suite.cases)
    npu_ft = next(c for c in suite.cases if c.implementation == "npu-ft")
    assert npu_ft.case_id == "tiny/lora/npu-ft/cpu/float32/s128b1/gc/v0"


def test_false_tags_npu_ft_only_and_keeps_the_parity_group():
    suite = parse_suite({**SUITE, "variants": [{}, {"fused_kernels": False}]}, "s.yaml", check_devices=False)
    # the reference runs its own modules either way: its v1 case repeats v0 and runs once
    assert _ids(suite) == {("npu-ft", "tiny/lora/npu-ft/cpu/float32/s128b1/gc/v0"): True,
                           ("reference", "tiny/lora/reference/cpu/float32/s128b1/gc/v0"): True,
                           ("npu-ft", "tiny/lora/npu-ft/cpu/float32/s128b1/gc/nofused/v1"): False}
    groups = {c.parity_group for c in suite.cases}
    assert len(groups) == 1  # fp32 rounding only: both npu-ft cases stay the reference's parity partners


def test_top_level_sweep_and_per_implementation_sweep():
    top = parse_suite({**SUITE, "fused_kernels": False}, "s.yaml", check_devices=False)
    assert {(c.implementation, c.fused_kernels) for c in top.cases} == {("npu-ft", False), ("reference", True)}
    sweep = parse_suite({**SUITE, "sweep": {"fused_kernels": [True, False]}}, "s.yaml", check_devices=False)
    assert sorted((c.implementation, c.fused_kernels) for c in sweep.cases) == [
        ("npu-ft", False), ("npu-ft", True), ("reference", True)]
    per_impl = parse_suite({**SUITE, "sweep_per_implementation": {"npu-ft": [{"fused_kernels": False},
                                                                             {"checkpoint_policy": "selective"}]}},
                           "s.yaml", check_devices=False)
    got = {(c.implementation, c.policy, c.fused_kernels) for c in per_impl.cases}
    assert got == {("npu-ft", "full", False), ("npu-ft", "selective", True), ("reference", "full", True)}


def test_custom_implementations_get_the_value():
    suite = parse_suite({**SUITE, "implementations": ["custom:m:f"], "fused_kernels": False}, "s.yaml",
                        check_devices=False)
    assert [c.fused_kernels for c in suite.cases] == [False]


@pytest.mark.parametrize("where, data", [
    ("fused_kernels", {"fused_kernels": "sometimes"}),
    ("variants[0].fused_kernels", {"variants": [{"fused_kernels": [1]}]}),
    ("sweep.fused_kernels[1]", {"sweep": {"fused_kernels": [True, "no way"]}}),
])
def test_bad_value_names_the_key(where, data):
    with pytest.raises(SuiteError, match=re.escape(f"s.yaml: key '{where}'")):
        parse_suite({**SUITE, **data}, "s.yaml", check_devices=False)


def test_old_result_rows_read_as_fused():
    case = BenchCase(suite="s", model="tiny", method="lora", implementation="npu-ft", device="cpu")
    old = {k: v for k, v in case.to_dict().items() if k != "fused_kernels"}
    assert BenchCase.from_dict(old).fused_kernels is True


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("fused", [True, False])
def test_npu_ft_implementation_applies_the_fused_ops(method, fused):
    from npu_ft.bench.impls import build_npu_ft
    from npu_ft.bench.shapes import build_model
    from npu_ft.modules.fused_blocks import fused_kernels_applied

    case = BenchCase(suite="s", model="tiny", method=method, implementation="npu-ft", device="cpu",
                     gradient_checkpointing=True, fused_kernels=fused)
    prepared = build_npu_ft(case, lambda: build_model("tiny", 0), torch.device("cpu"))
    counts = fused_kernels_applied(prepared.model)
    layers = prepared.model.config.num_hidden_layers
    if fused:
        assert "fused_blocks" in prepared.features
        # two norms per layer and the final norm; one residual norm, attention and MLP per layer
        assert counts == {"rms_norm": 2 * layers + 1, "residual_rms_norm": layers, "rope": layers,
                          "swiglu": layers}
    else:
        assert "fused_blocks" not in prepared.features and counts == {}
    # checkpointing was enabled after the patch: the fused model still trains under it
    ids = torch.randint(0, prepared.model.config.vocab_size, (1, 12))
    loss = prepared.model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in prepared.model.parameters() if p.requires_grad)


def test_report_labels_say_when_the_fused_ops_were_off():
    from npu_ft.bench.frontier import point_label

    row = {"policy": "full", "batch_size": 2, "seq_len": 64}
    assert point_label(row) == "full b2 s64"  # rows from before the column, and fused rows
    assert point_label({**row, "fused_kernels": True}) == "full b2 s64"
    assert point_label({**row, "fused_kernels": "False"}) == "full b2 s64 nofused"  # as read back from a CSV


def test_ratios_pair_each_fused_case_with_its_twin_without_the_ops():
    from npu_ft.bench.report import ratios

    def row(fused, policy, tok, mem, impl="npu-ft"):
        return {"implementation": impl, "model": "m", "device": "cpu", "dtype": "float32", "seq_len": 64,
                "batch_size": 1, "data": "random", "policy": policy, "method": "lora", "method_name": "lora",
                "lora_r": 8, "fused_kernels": fused, "status": "ok", "case_id": f"{impl}-{policy}-{fused}",
                "tokens_per_s": tok, "tokens_per_s_min": tok * 0.9, "tokens_per_s_max": tok * 1.1,
                "train_mem_bytes": mem, "tensor_mem_bytes": mem / 2, "peak_mem_bytes": 2 * mem, "weight_bytes": 1,
                "steps": 3, "timed_steps": 3}

    rows = [row(True, "selective", 110.0, 800), row("False", "selective", 100.0, 1000),  # read back from a CSV
            row(True, "off", 120.0, 900), row(True, "full", 90.0, 500), row(False, "full", 90.0, 500)]
    fused = {r["ratio"]: r for r in ratios(rows) if "fused block ops" in r["ratio"]}
    assert sorted(fused) == ["lora: npu-ft (full): fused block ops / without",
                             "lora: npu-ft (selective): fused block ops / without"]  # "off" has no twin
    sel = fused["lora: npu-ft (selective): fused block ops / without"]
    assert sel["tokens_per_s"] == pytest.approx(1.1) and sel["train_mem"] == pytest.approx(0.8)
    assert sel["tensor_mem"] == pytest.approx(0.8)
