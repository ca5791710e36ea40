"""Suite sweeps, the sft data mode, significance flags and frontiers (no case processes)."""

from __future__ import annotations

import json

import pytest

from npu_ft.bench import aggregate, parse_suite, ratios
from npu_ft.bench.data import case_rows, make_batches, write_alpaca_synth
from npu_ft.bench.frontier import frontier, statements
from npu_ft.bench.report import significance
from npu_ft.bench.suite import BenchCase, SuiteError

BASE = {"models": ["tiny"], "methods": ["lora"], "devices": ["cpu"]}


def _ids(suite):
    return [(c.implementation, c.policy, c.batch_size) for c in suite.cases]


def test_sweep_expands_per_implementation_and_drops_repeats():
    suite = parse_suite({**BASE, "implementations": ["npu-ft", "reference", "llamafactory"],
                         "sweep": {"checkpoint_policy": ["off", "full", "selective"]},
                         "sweep_per_implementation": {"llamafactory": [{"checkpoint_policy": "full"},
                                                                       {"checkpoint_policy": "full",
                                                                        "batch_size": 2}]}},
                        "s.yaml", check_devices=False)
    assert _ids(suite) == [("npu-ft", "off", 1), ("npu-ft", "full", 1), ("npu-ft", "selective", 1),
                           # the reference has no selective: it would run full again, so it runs once
                           ("reference", "off", 1), ("reference", "full", 1),
                           ("llamafactory", "full", 1), ("llamafactory", "full", 2)]
    assert len({c.case_id for c in suite.cases}) == len(suite.cases)
    # checkpointing does not change the numbers: one parity group per batch size
    assert len({c.parity_group for c in suite.cases}) == 2


def test_yaml_off_and_explicit_policy_switch_checkpointing():
    # YAML reads `off` as false; a policy given alone turns checkpointing on
    suite = parse_suite({**BASE, "implementations": ["npu-ft"], "checkpoint_policy": "selective",
                         "variants": [{}, {"checkpoint_policy": False}]}, "s.yaml", check_devices=False)
    assert [(c.gradient_checkpointing, c.policy) for c in suite.cases] == [(True, "selective"), (False, "off")]


@pytest.mark.parametrize("patch, words", [
    ({"sweep": {"batch": [1, 2]}}, ["'sweep.batch'", "unknown case setting"]),
    ({"sweep": {"batch_size": []}}, ["'sweep.batch_size'", "non-empty list"]),
    ({"sweep": {"batch_size": [1, 0]}}, ["'sweep.batch_size[1]'", ">= 1"]),
    ({"sweep": {"checkpoint_policy": ["fastest"]}}, ["unknown policy 'fastest'"]),
    ({"sweep_per_implementation": {"reference": {"batch_size": [2]}}}, ["'sweep_per_implementation.reference'"]),
    ({"sweep_per_implementation": {"npu-ft": [{"seq": 8}]}}, ["'sweep_per_implementation.npu-ft[0].seq'"]),
    ({"data": {"mode": "real"}}, ["'data.mode'", "'real'"]),
    ({"data": {"packed": True}}, ["'data.packed'"]),
])
def test_bad_sweep_or_data_is_named(patch, words):
    with pytest.raises(SuiteError) as err:
        parse_suite({**BASE, "implementations": ["npu-ft"], **patch}, "s.yaml", check_devices=False)
    for w in words:
        assert w in str(err.value), str(err.value)


def _case(**kw):
    args = dict(suite="t", model="tiny", method="lora", implementation="npu-ft", device="cpu", seq_len=64,
                batch_size=2, steps=3, warmup=1)
    args.update(kw)
    return BenchCase(**args)


def test_alpaca_synth_has_alpaca_like_lengths(tmp_path):
    name = write_alpaca_synth(tmp_path, examples=400, seed=0)
    records = json.loads((tmp_path / "alpaca_synth.json").read_text())
    assert json.loads((tmp_path / "dataset_info.json").read_text()) == {name: {"file_name": "alpaca_synth.json"}}
    outputs = sorted(len(r["output"].split()) for r in records)
    with_input = sum(1 for r in records if r["input"]) / len(records)
    assert 0.3 < with_input < 0.5
    assert 40 <= outputs[len(outputs) // 2] <= 90  # median response ~60 words
    assert outputs[-1] > 4 * outputs[len(outputs) // 2]  # a long tail
    assert write_alpaca_synth(tmp_path / "again", examples=400, seed=0) == name
    assert (tmp_path / "again" / "alpaca_synth.json").read_text() == (tmp_path / "alpaca_synth.json").read_text()


@pytest.mark.parametrize("packing", [True, False])
def test_sft_rows_mask_the_prompt_and_count_tokens(packing):
    case = _case(data={"mode": "sft", "dataset": "alpaca-synth", "packing": packing, "examples": 40})
    rows = case_rows(case, vocab_size=151936)
    assert len(rows) == (case.warmup + case.steps) * case.batch_size
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) <= case.seq_len
        assert row["labels"][0] == -100  # the prompt (template + instruction) is not learned
        assert any(t != -100 for t in row["labels"])
        assert ("position_ids" in row) == packing
    batches = make_batches(case, vocab_size=151936)
    for b in batches:
        assert b.input_ids.shape[1] % 8 == 0 and b.input_ids.shape[0] == case.batch_size
        assert 0 < b.labelled < b.tokens <= b.positions
    if packing:
        assert all(b.input_ids.shape[1] == case.seq_len for b in batches)
    # the tiny model's vocabulary: ids folded, structure kept
    small = make_batches(case, vocab_size=1024)
    assert int(small[0].input_ids.max()) < 1024
    assert [b.labelled for b in small] == [b.labelled for b in batches]


def test_random_rows_label_every_position_but_the_first():
    batches = make_batches(_case(), vocab_size=1024)
    assert all(b.tokens == b.positions == 128 and b.labelled == 2 * 63 for b in batches)


def _row(impl, policy, tok, mem, lo=None, hi=None, steps=6, **kw):
    return {"status": "ok", "model": "m", "method": "lora", "device": "cpu", "dtype": "float32", "data": "d",
            "implementation": impl, "policy": policy, "batch_size": 1, "seq_len": 8, "tokens_per_s": tok,
            "tokens_per_s_min": lo if lo is not None else tok * 0.98, "tokens_per_s_max": hi or tok * 1.02,
            "train_mem_bytes": mem, "timed_steps": steps, **kw}


def test_frontier_and_statements():
    ours = [_row("npu-ft", "off", 100, 900), _row("npu-ft", "full", 60, 300), _row("npu-ft", "selective", 90, 500),
            _row("npu-ft", "full", 50, 600)]  # dominated by selective
    assert [r["policy"] for r in frontier(ours)] == ["full", "selective", "off"]
    lf = [_row("llamafactory", "full", 40, 400), _row("llamafactory", "off", 70, 1000)]
    by = {s["baseline_point"]: s for s in statements(ours + lf) if s["challenger"] == "npu-ft"}
    at400 = by["full b1 s8"]
    assert at400["best_at_mem_point"] == "full b1 s8" and at400["best_at_mem_speedup"] == pytest.approx(1.5)
    assert at400["least_mem_train_mem_bytes"] == 300 and at400["at_or_above"]
    at1000 = by["off b1 s8"]
    assert at1000["best_at_mem_tokens_per_s"] == 100 and at1000["least_mem_ratio"] == pytest.approx(0.5)
    # below npu-ft's least memory there is no point: not at or above
    assert not statements(ours + [_row("llamafactory", "full", 10, 100)])[0]["at_or_above"]


def test_significance_flags():
    a, b = _row("npu-ft", "full", 100, 1), _row("reference", "full", 50, 1)
    assert significance(a, b) == ""
    assert "overlap" in significance(a, _row("reference", "full", 95, 1, lo=80, hi=101))
    assert "< 3 timed steps" in significance(_row("npu-ft", "full", 100, 1, steps=2), b)


def test_ratio_pairs_with_the_baselines_default_checkpointing():
    def result(impl, gc, step_s, policy="full"):
        case = _case(implementation=impl, gradient_checkpointing=gc, checkpoint_policy=policy, steps=3, warmup=1)
        return {"case": case.to_dict(), "status": "ok", "error": "", "device_name": "x", "versions": {},
                "git_commit": "c", "peak_mem_bytes": 2000, "baseline_mem_bytes": 1000, "mem_kind": "rss",
                "losses": [1.0] * 4, "step_s": step_s, "trainable_params": 1, "total_params": 2,
                "weight_bytes": 10, "features": [], "build_s": 0.1}

    rows = aggregate([result("npu-ft", True, [9, 1, 1, 1], "selective"), result("llamafactory", True, [9, 2, 2, 2]),
                      result("llamafactory", False, [9, 1.5, 1.5, 1.5])])
    (r,) = [x for x in ratios(rows) if x["ratio"].startswith("lora: npu-ft")]
    assert r["ratio"] == "lora: npu-ft (selective) / llamafactory (full)" and r["tokens_per_s"] == pytest.approx(2.0)
    assert r["significance"] == ""
