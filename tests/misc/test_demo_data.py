"""The shipped data/ folder: what scripts/make_demo_data.py writes, and what the recipes name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_files_are_what_the_script_writes():
    for name, data in _script().build().items():
        assert (ROOT / "data" / name).read_bytes() == data, f"regenerate: python scripts/make_demo_data.py ({name})"


def test_every_recipe_dataset_is_shipped():
    info = json.loads((ROOT / "data" / "dataset_info.json").read_text())
    for recipe in sorted((ROOT / "recipes").rglob("*.yaml")):
        keys = yaml.safe_load(recipe.read_text())
        if keys.get("dataset_dir", "data") != "data" or "dataset" not in keys:
            continue
        for name in str(keys["dataset"]).split(","):
            assert name.strip() in info, f"{recipe}: dataset {name!r} is not in data/dataset_info.json"
            assert (ROOT / "data" / info[name.strip()]["file_name"]).is_file()
