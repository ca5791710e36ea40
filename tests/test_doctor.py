"""`npu-ft doctor`: passes on a healthy CPU, and catches a kernel that returns wrong results."""

from __future__ import annotations

import json

import pytest
import torch

from npu_ft import doctor
from npu_ft.ops import lora, tolerance


def test_doctor_passes_on_cpu_and_reports_kernels(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert doctor.doctor_main(["--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 failed" in text
    assert doctor.LOW_PRECISION_NOTE in text  # bf16 rows ran: the table says why their errors are not zero
    report = json.loads(out.read_text())
    rows = {(r["op"], r["dtype"]): r for r in report["results"]}
    ops = {op for op, _ in rows}
    assert ops == {"nf4_quantize", "nf4_dequantize", "blockwise_8bit", "lora_linear fwd+bwd", "nf4_linear fwd+bwd",
                   "rms_norm+residual fwd+bwd", "rope fwd+bwd", "swiglu fwd+bwd", "linear_cross_entropy fwd+bwd",
                   "adamw8bit_update x3", "dora_linear fwd+bwd", "dora_nf4_linear fwd+bwd",
                   "lora_fa_linear fwd+bwd", "lora_fa_nf4_linear fwd+bwd"}
    assert {dtype for _, dtype in rows} == {"fp32", "bf16"}
    # the CPU backend registers its own lora kernels: the doctor must say they served the call
    assert rows[("lora_linear fwd+bwd", "fp32")]["kernel"] == "cpu"
    # tolerances come from the op registry's table, the one the op tests use
    assert rows[("nf4_quantize", "bf16")]["tolerance"] == "exact"
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        expected = tolerance("lora_linear_backward", dtype).describe()
        assert rows[("lora_linear fwd+bwd", name)]["tolerance"] == expected
    assert all(r["passed"] for r in report["results"])
    assert report["environment"]["chosen_device"] == "cpu"


def test_doctor_fails_on_a_wrong_kernel(monkeypatch, capsys):
    real = lora.lora_linear

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) * (1 + 1e-3)

    monkeypatch.setattr(lora, "lora_linear", off_by_a_little)
    assert doctor.doctor_main(["--device", "cpu", "--dtype", "fp32"]) == 1
    text = capsys.readouterr().out
    failing = [line for line in text.splitlines() if line.startswith("lora_linear") and "FAIL" in line]
    assert failing, text


def test_doctor_catches_a_wrong_fused_loss(monkeypatch, capsys):
    from npu_ft.ops import linear_cross_entropy as lce

    real = lce.linear_cross_entropy
    monkeypatch.setattr(lce, "linear_cross_entropy", lambda *a, **kw: real(*a, **kw) * (1 + 1e-3))
    assert doctor.doctor_main(["--device", "cpu", "--dtype", "fp32"]) == 1
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if line.startswith("linear_cross_entropy") and "FAIL" in line], text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_doctor_unavailable_device_is_a_clear_error(capsys):
    from npu_ft.cli import main

    assert main(["doctor", "--device", "cuda"]) == 1  # an unavailable device is bad input, not usage
    assert "cuda unavailable:" in capsys.readouterr().err
