"""The typed config: groups of dataclass fields, the transformers snapshot, reading without heavy
imports, and the rules that stop a recipe with nothing to do or an unknown name before any work."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from npu_ft.config import OPTIONS, ConfigError, SftConfig, UnsupportedError, build_config, load_config
from npu_ft.config.schema import field_infos

ROOT = Path(__file__).resolve().parents[2]


def _err(**keys) -> str:
    with pytest.raises(ConfigError) as info:
        build_config({"model_name_or_path": "m", **keys}, source="r.yaml")
    return str(info.value)


def test_every_key_is_a_typed_field_of_one_group():
    hints = typing.get_type_hints(SftConfig)
    groups = {info.group for info in OPTIONS.values()}
    assert groups <= {"model", "method", "data", "training", "npu_ft", "generation", "other"}
    for name, info in OPTIONS.items():
        assert name in hints, name
        assert info.status in ("supported", "ignored", "unsupported"), name
    assert hints["lora_rank"] is int and hints["learning_rate"] is float
    assert typing.get_args(hints["finetuning_type"]) == ("lora", "full", "vera")
    assert OPTIONS["device"].own and not OPTIONS["lora_rank"].own


def test_snapshot_of_transformers_is_current():
    """npu_ft/config/hf_fields.py equals what the installed transformers generates."""
    from npu_ft.config import hf_snapshot

    committed = Path(hf_snapshot.snapshot_path()).read_text(encoding="utf-8")
    assert committed == hf_snapshot.render(), "regenerate: python -m npu_ft.config.hf_snapshot --write"


def test_reading_a_recipe_imports_neither_torch_nor_transformers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\nstage: sft\ndo_train: true\ndataset: a\ntemplate: qwen\n"
                      "lr_scheduler_type: cosine\noptim: adamw_torch\nreport_to: none\n")
    code = ("import sys; from npu_ft.config import load_config; load_config(sys.argv[1]); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'bitsandbytes',"
            " 'deepspeed', 'peft', 'accelerate')); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=600)
    assert out.stdout.strip() == "[]", out.stdout


def test_typed_values_and_derived_keys():
    cfg = build_config({"model_name_or_path": "m", "lora_rank": "16", "learning_rate": "2e-5", "bf16": "yes",
                        "dataset": "a, b", "neat_packing": True})
    assert cfg.lora_rank == 16 and cfg.lora_alpha == 32 and cfg.learning_rate == pytest.approx(2e-5)
    assert cfg.bf16 is True and cfg.dataset == ["a", "b"] and cfg.packing is True
    assert cfg.data_arguments().effective_cutoff_len == 2047
    with pytest.raises(AttributeError):
        cfg.lora_rnak = 3  # a typo never becomes a new attribute


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match="'lora_rank'.*>= 1"):
        SftConfig(model_name_or_path="m", lora_rank=0)
    with pytest.raises(UnsupportedError, match="use_galore is not supported by npu-ft yet"):
        SftConfig(model_name_or_path="m", use_galore=True)


@pytest.mark.parametrize("keys, key, words", [
    ({"max_steps": 0}, "max_steps", "trains nothing"),
    ({"num_train_epochs": 0}, "num_train_epochs", "trains nothing"),
    ({"num_train_epochs": 0.0, "max_steps": -1}, "num_train_epochs", "trains nothing"),
    ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type", "did you mean 'cosine'"),
    ({"optim": "adamw"}, "optim", "unknown value 'adamw'"),
    ({"report_to": "wandb,tensorbord"}, "report_to", "did you mean 'tensorboard'"),
    ({"template": "bogus"}, "template", "unknown template 'bogus'"),
])
def test_nothing_to_do_and_unknown_names(keys, key, words):
    msg = _err(**keys)
    assert msg.startswith(f"r.yaml: key '{key}': ") and words in msg, msg


def test_epochs_zero_is_fine_with_max_steps():
    assert build_config({"model_name_or_path": "m", "num_train_epochs": 0, "max_steps": 5}).max_steps == 5


def test_template_error_names_template_not_dataset(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ndo_train: true\ndataset: toy\ntemplate: bogus\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    assert "key 'template'" in str(info.value) and "'dataset'" not in str(info.value)


def test_data_arguments_are_one_class():
    from npu_ft.config.data_args import DataArguments as ConfigData
    from npu_ft.data import DataArguments

    assert DataArguments is ConfigData
    assert set(field_infos(DataArguments)) <= set(OPTIONS)
    assert dataclasses.is_dataclass(SftConfig) and issubclass(SftConfig, DataArguments)


def test_missing_tracker_package_is_one_line(monkeypatch):
    import importlib.util

    from npu_ft.config.trackers import check_trackers_installed, missing_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert missing_trackers(["none", "wandb"]) == ["wandb"]
    with pytest.raises(ConfigError) as info:
        check_trackers_installed(["wandb"], source="r.yaml")
    assert str(info.value) == ("r.yaml: key 'report_to': tracker 'wandb' needs the wandb package, which is not "
                               "installed (pip install wandb, or remove it from report_to)")
    check_trackers_installed(["none"])


def test_ddp_find_unused_parameters_off_for_lora_as_llamafactory(tmp_path):
    from npu_ft.config import to_training_arguments

    lora = build_config({"model_name_or_path": "m"})
    assert to_training_arguments(lora, output_dir=str(tmp_path)).ddp_find_unused_parameters is False
    full = build_config({"model_name_or_path": "m", "finetuning_type": "full"})
    assert to_training_arguments(full, output_dir=str(tmp_path)).ddp_find_unused_parameters is None
    chosen = build_config({"model_name_or_path": "m", "ddp_find_unused_parameters": True})
    assert to_training_arguments(chosen, output_dir=str(tmp_path)).ddp_find_unused_parameters is True
