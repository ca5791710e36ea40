"""Small shared pieces of the launch tests: a tiny model folder, a toy alpaca dataset, recipes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def toy_dataset(folder: Path, n: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(4))
        out = digits[::-1] if i % 2 else digits
        rows.append({"instruction": "Reverse the digits." if i % 2 else "Repeat the digits.", "input": digits,
                     "output": out})
    (folder / "toy.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.json"}}))
    return folder


def tiny_recipe(model_dir: Path, data_dir: Path, out: Path, **kw: Any) -> dict[str, Any]:
    recipe = {
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 8, "dataset": "toy", "dataset_dir": str(data_dir), "template": "qwen",
        "cutoff_len": 64, "output_dir": str(out), "overwrite_output_dir": True, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1, "learning_rate": 1.0e-2, "max_steps": 2, "logging_steps": 1,
        "save_steps": 100, "save_strategy": "no", "seed": 42, "device": "cpu", "report_to": "none",
        "disable_gradient_checkpointing": True, "disable_shuffling": True, "disable_tqdm": True,
    }
    recipe.update(kw)
    return recipe


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    # DeepSpeed JIT-builds its CPU ops once; keep them between runs
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "npu-ft" / "torch_extensions"))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
              "NPROC_PER_NODE", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def log_losses(out: Path) -> list[float]:
    with open(out / "trainer_log.jsonl", encoding="utf-8") as f:
        return [rec["loss"] for rec in map(json.loads, filter(str.strip, f)) if "loss" in rec]


PYTHON = sys.executable
