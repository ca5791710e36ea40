"""What a run tells its user (issue #16): the plan in the log, running_log.txt, the model card in
output_dir and every checkpoint, LLaMA-Factory's tokenizer_config keys, "Resuming from ...", the log
level switch, and do_predict with predict_with_generate through run_sft."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from npu_ft.config import load_config
from npu_ft.train.run import run_sft

from ._sft_helpers import base_recipe, tiny_model_dir, write_dataset, write_recipe


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return {"model": tiny_model_dir(root), "data": write_dataset(root / "data", n=12), "root": root}


def _recipe(env, tmp_path, **overrides):
    return write_recipe(tmp_path / "r.yaml", base_recipe(env["model"], env["data"], tmp_path / "out", **overrides))


def test_plan_log_running_log_model_card_and_tokenizer_keys(env, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="npu_ft")
    run_sft(load_config(_recipe(env, tmp_path, max_steps=4, save_steps=2)))
    text = caplog.text
    assert "trainable params: " in text and "|| all params: " in text and "trainable%: " in text
    assert "effective batch size 2 (2 per device x 1 accumulation x 1 processes); 4 optimizer steps" in text
    assert "npu_ft::lora_linear: 14 layers, cpu kernel" in text
    assert "device: cpu" in text and "dtype float32" in text and "fused_cross_entropy on" in text
    assert "training example:\ninput_ids:\n[" in text and "\nlabels:\n" in text and "<|im_start|>assistant" in text
    out = tmp_path / "out"
    running = (out / "running_log.txt").read_text()
    assert "trainable params" in running and "training took" in running and running.startswith("[INFO|")
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        card = (folder / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: peft\nbase_model: ") and "- lora_rank: 8" in card, folder
    assert "- training loss: " in (out / "README.md").read_text()
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["padding_side"] == "right" and tok["split_special_tokens"] is False


def test_resume_is_announced(env, tmp_path, caplog):
    recipe = _recipe(env, tmp_path, max_steps=4, save_steps=2)
    run_sft(load_config(recipe))
    import shutil

    for name in ("checkpoint-4", "adapter_model.safetensors"):
        target = tmp_path / "out" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    caplog.set_level(logging.INFO, logger="npu_ft")
    result = run_sft(load_config(recipe, ["overwrite_output_dir=false"]))
    assert result.resumed_from.endswith("checkpoint-2")
    assert "Resuming from checkpoint-2 (step 2 of 4)" in caplog.text


def test_predict_with_generate_writes_predictions_and_scores(env, tmp_path):
    pytest.importorskip("rouge_chinese")
    recipe = _recipe(env, tmp_path, max_steps=2, val_size=3, do_predict=True, predict_with_generate=True,
                     do_sample=False, max_new_tokens=4, per_device_eval_batch_size=2)
    result = run_sft(load_config(recipe))
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(set(line) == {"prompt", "predict", "label"} for line in lines)
    assert all(line["prompt"].endswith("<|im_start|>assistant\n") for line in lines)
    scores = json.loads((out / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"} <= set(scores)
    assert result.metrics["predict_rouge-l"] == scores["predict_rouge-l"]


def test_do_predict_needs_examples(env, tmp_path):
    from npu_ft.train.run import TrainingError

    with pytest.raises(TrainingError, match="key 'do_predict': needs eval_dataset or val_size"):
        run_sft(load_config(_recipe(env, tmp_path, do_predict=True)))
    assert not (tmp_path / "out").exists()


def test_log_level_flag_and_variable(env, tmp_path):
    recipe = _recipe(env, tmp_path, max_steps=1, save_steps=1)
    quiet = subprocess.run([sys.executable, "-m", "npu_ft.cli", "train", str(recipe), "--log-level", "warning"],
                           capture_output=True, text=True, timeout=1800)
    assert quiet.returncode == 0, quiet.stderr
    assert "[INFO|" not in quiet.stderr and "trainable params" not in quiet.stderr
    bad = subprocess.run([sys.executable, "-m", "npu_ft.cli", "train", str(recipe), "--log-level", "loud"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--log-level='loud'" in bad.stderr
    env_bad = subprocess.run([sys.executable, "-m", "npu_ft.cli", "train", str(recipe)], capture_output=True,
                             text=True, timeout=600, env={**__import__("os").environ, "NPU_FT_VERBOSITY": "loud"})
    assert env_bad.returncode == 1 and "NPU_FT_VERBOSITY='loud'" in env_bad.stderr
