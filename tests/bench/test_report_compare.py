"""Aggregation, parity, ratios and `npu-ft bench compare` on synthetic results (no processes)."""

from __future__ import annotations

import pandas as pd
import pytest

from npu_ft.bench import aggregate, compare, parity, ratios, write_reports
from npu_ft.bench.cli import bench_main
from npu_ft.bench.report import COLUMNS
from npu_ft.bench.suite import DEFAULT_CROSS_DEVICE_TOLERANCES, DEFAULT_TOLERANCES, BenchCase


def _result(method, impl, device="cpu", losses=(2.0, 1.5, 1.0), step_s=(9.0, 1.0, 2.0), peak=1000, wbytes=400,
            repeat=0):
    case = BenchCase(suite="t", model="tiny", method=method, implementation=impl, device=device,
                     seq_len=10, batch_size=2, steps=2, warmup=1)
    return {"case": case.to_dict(), "status": "ok", "error": "", "repeat": repeat, "device_name": "cpu-x",
            "versions": {"torch": "2", "torch_npu": "not installed", "transformers": "5", "peft": "0.2",
                         "bitsandbytes": "0.5"}, "git_commit": "abc",
            "peak_mem_bytes": peak * 2**20, "mem_kind": "rss", "baseline_mem_bytes": 10, "losses": list(losses),
            "step_s": list(step_s), "trainable_params": 5, "total_params": 50, "weight_bytes": wbytes,
            "features": ["x"], "build_s": 1.0}


def _results():
    return [
        _result("lora", "npu-ft", peak=700, step_s=(9, 0.5, 0.5)),
        _result("lora", "reference", peak=1000, step_s=(9, 1.0, 1.0), losses=(2.0, 1.5, 1.00001)),
        _result("qlora", "npu-ft", peak=300, wbytes=100, losses=(2.0, 1.6, 1.1)),
        _result("qlora", "reference", peak=400, wbytes=120, losses=(2.0, 1.6, 1.2)),  # parity fails
    ]


def test_aggregate_pools_repeats_and_skips_warmup():
    rows = aggregate([_result("lora", "npu-ft", step_s=(100, 1, 3)), _result("lora", "npu-ft", step_s=(100, 2, 2),
                                                                           peak=3000, repeat=1)])
    (row,) = rows
    assert row["s_per_step_median"] == 2 and row["s_per_step_min"] == 1 and row["s_per_step_max"] == 3
    assert row["tokens_per_s"] == 20 / 2 and row["tokens_per_s_max"] == 20
    assert row["peak_mem_bytes"] == 2000 * 2**20 and row["peak_mem_max_bytes"] == 3000 * 2**20
    assert row["repeats_ok"] == 2 and row["status"] == "ok"


def test_parity_and_ratios():
    rows = aggregate(_results())
    par = {p["method"]: p for p in parity(rows, DEFAULT_TOLERANCES, DEFAULT_CROSS_DEVICE_TOLERANCES)}
    assert par["lora"]["pass"] and par["lora"]["max_rel_loss_diff"] == pytest.approx(1e-5, rel=1e-3)
    assert not par["qlora"]["pass"] and par["qlora"]["tolerance"] == 1e-3
    rat = {r["ratio"]: r for r in ratios(rows)}
    lora = rat["lora: npu-ft (off) / reference (off)"]
    assert lora["tokens_per_s"] == pytest.approx(2.0)
    assert lora["peak_mem"] == pytest.approx(0.7)
    # training memory: peak minus the post-build baseline (10 bytes here)
    assert lora["train_mem"] == pytest.approx((700 * 2**20 - 10) / (1000 * 2**20 - 10))
    assert rat["npu-ft: qlora (off) / lora (off)"]["peak_mem"] == pytest.approx(300 / 700)
    # 2 timed steps per side: never significant, whatever the ranges say
    assert "< 3 timed steps" in lora["significance"]


def test_cross_device_parity():
    res = [_result("lora", "npu-ft"), _result("lora", "npu-ft", device="npu", losses=(2.0, 1.5, 1.0005))]
    par = parity(aggregate(res), DEFAULT_TOLERANCES, DEFAULT_CROSS_DEVICE_TOLERANCES)
    (p,) = par
    assert p["kind"] == "device" and p["compare"] == "npu-ft (off): npu vs cpu" and p["pass"]


def test_reports_and_compare(tmp_path, capsys):
    meta = {"name": "t", "description": "", "tolerances": DEFAULT_TOLERANCES,
            "cross_device_tolerance": DEFAULT_CROSS_DEVICE_TOLERANCES}
    a, b = tmp_path / "a", tmp_path / "b"
    write_reports(_results(), meta, a)
    faster = [dict(r, step_s=[x / 2 for x in r["step_s"]], peak_mem_bytes=r["peak_mem_bytes"] * 2) for r in _results()]
    write_reports(faster, meta, b)
    for name in ("results.csv", "parity.csv", "ratios.csv", "report.md", "memory_vs_throughput.png", "loss_curves.png"):
        assert (a / name).stat().st_size > 0, name
    df = pd.read_csv(a / "results.csv")
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS and len(df) == 4
    cmp = compare(a / "results.csv", b / "results.csv")
    assert len(cmp) == 4
    assert cmp["tokens_per_s_ratio"].tolist() == pytest.approx([2.0] * 4)
    assert cmp["peak_mem_mib_ratio"].tolist() == pytest.approx([2.0] * 4, rel=1e-2)
    out_md = tmp_path / "cmp.md"
    assert bench_main(["compare", str(a / "results.csv"), str(b / "results.csv"), "--out", str(out_md)]) == 0
    text = capsys.readouterr().out
    assert "2.00×" in text and out_md.read_text().strip() == text.strip()


def test_compare_rejects_a_foreign_csv(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    assert bench_main(["compare", str(bad), str(bad)]) == 1
    assert "missing columns" in capsys.readouterr().err


def test_mfu_uses_the_runs_best_gemm_peak():
    """A process whose GEMM timing met load (half the others' peak) would report twice its MFU: every
    row of the same shape divides by the best peak of the run and keeps its own as a column."""
    fast, slow = _result("lora", "npu-ft"), _result("lora", "reference")
    for r, peak in ((fast, 100e9), (slow, 50e9)):
        r.update(achieved_flops=40e9, gemm_peak_flops=peak, model_flops_per_token=1e9)
    rows = {r["implementation"]: r for r in aggregate([fast, slow])}
    assert rows["reference"]["gemm_peak_flops"] == rows["npu-ft"]["gemm_peak_flops"] == 100e9
    assert rows["reference"]["gemm_peak_process_flops"] == 50e9
    assert rows["reference"]["mfu"] == pytest.approx(0.4) and rows["npu-ft"]["mfu"] == pytest.approx(0.4)


def test_method_ratios_against_npu_ft_lora_and_full():
    """Each npu-ft method against npu-ft's plain LoRA (adapters) or full fine-tuning with torch's
    AdamW (8-bit optimizers), with the optimizer-state ratio."""
    def with_settings(result, **settings):
        result["case"] = BenchCase.from_dict({**result["case"], **settings}).to_dict()
        return result

    results = [_result("lora", "npu-ft", peak=700), with_settings(_result("lora", "npu-ft", peak=800), adapter="dora"),
               _result("full", "npu-ft", peak=2000),
               with_settings(_result("full", "npu-ft", peak=1500), optim="adamw_8bit_all")]
    for r, state in zip(results, (80, 90, 800, 210), strict=True):
        r["optimizer_state_bytes"] = state
    rat = {r["ratio"]: r for r in ratios(aggregate(results))}
    assert set(rat) == {"npu-ft: dora (off) / lora (off)", "npu-ft: full+adamw_8bit_all (off) / full (off)"}
    assert rat["npu-ft: full+adamw_8bit_all (off) / full (off)"]["optimizer_state"] == pytest.approx(210 / 800)
    assert rat["npu-ft: dora (off) / lora (off)"]["peak_mem"] == pytest.approx(800 / 700)


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    """`npu-ft bench report DIR` on a folder without a run's suite.json / raw.jsonl: one line, exit 1,
    and nothing written into the folder."""
    (tmp_path / "notes.txt").write_text("mine")
    assert bench_main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no suite.json or raw.jsonl here" in err and str(tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_run_refuses_an_out_folder_with_foreign_files(tmp_path, capsys):
    """A --out folder that holds a report.md npu-ft did not write: one line, exit 1, the file kept."""
    suite = tmp_path / "s.yaml"
    suite.write_text("models: [tiny]\nmethods: [lora]\nimplementations: [npu-ft]\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my own notes")
    assert bench_main([str(suite), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds report.md, not from an `npu-ft bench` run" in err
    assert sorted(p.name for p in out.iterdir()) == ["report.md"] and (out / "report.md").read_text() == "my own notes"
