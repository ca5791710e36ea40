"""Shared pieces of the training tests: a tiny model folder (built once per session), a small
alpaca dataset, recipe writing and reading ``trainer_log.jsonl``."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import yaml

_MODEL_CACHE: dict[str, Path] = {}


def tiny_model_dir(tmp_root: Path, arch: str = "qwen2") -> Path:
    """A from_pretrained-able tiny model folder (hidden 64, 2 layers, Qwen tokenizer), built once."""
    if arch not in _MODEL_CACHE:
        from npu_ft.model.tiny import build_tiny_model

        _MODEL_CACHE[arch] = build_tiny_model(tmp_root / f"tiny-{arch}", arch=arch, seed=0)
    return _MODEL_CACHE[arch]


def write_dataset(folder: Path, n: int = 24, name: str = "toy", seed: int = 0) -> Path:
    """Alpaca-format digit tasks + dataset_info.json in ``folder``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(4))
        if i % 2:
            rows.append({"instruction": "Reverse the digits.", "input": digits, "output": digits[::-1]})
        else:
            rows.append({"instruction": "Repeat the digits.", "input": digits, "output": digits})
    (folder / f"{name}.json").write_text(json.dumps(rows, indent=1))
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {"file_name": f"{name}.json"}
    info_path.write_text(json.dumps(info, indent=2))
    return folder


def base_recipe(model_dir: Path, data_dir: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "dataset": "toy",
        "dataset_dir": str(data_dir),
        "template": "qwen",
        "cutoff_len": 64,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "max_steps": 4,
        "logging_steps": 1,
        "save_steps": 2,
        "seed": 42,
        "device": "cpu",
        "report_to": "none",
        "disable_gradient_checkpointing": True,
        "disable_tqdm": True,
    }
    recipe.update(overrides)
    return {k: v for k, v in recipe.items() if v is not None}


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    with open(os.path.join(output_dir, "trainer_log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def step_losses(output_dir: Path) -> dict[int, float]:
    """``{step: loss}`` from trainer_log.jsonl (logging_steps 1)."""
    return {rec["current_steps"]: rec["loss"] for rec in read_log(output_dir) if "loss" in rec}
