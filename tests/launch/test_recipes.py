"""The shipped recipes: the generated Qwen ones up to date with the table of
scripts/generate_recipes.py, every recipe loadable and without trust_remote_code; DeepSpeed configs."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import yaml

from npu_ft.config import load_config
from npu_ft.launch.checks import check_launch, zero_offload, zero_stage
from npu_ft.launch.estimate import MODELS

from ._helpers import ROOT


def _load_generator():
    """scripts/generate_recipes.py is a development script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("generate_recipes", ROOT / "scripts" / "generate_recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


GENERATOR = _load_generator()
RECIPES = GENERATOR.all_recipes()
SHIPPED = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_generated_files_are_up_to_date():
    stale = GENERATOR.write_all(ROOT, check=True)
    assert not stale, f"run `python scripts/generate_recipes.py`; stale: {stale}"


def test_the_generator_detects_a_stale_recipe(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "recipes.md").write_text((ROOT / "docs" / "recipes.md").read_text())
    assert GENERATOR.write_all(tmp_path) and not GENERATOR.write_all(tmp_path, check=True)
    one = tmp_path / RECIPES[0].path
    one.write_text(one.read_text().replace("lora_rank: 16", "lora_rank: 8"))
    assert GENERATOR.write_all(tmp_path, check=True) == [RECIPES[0].path]


def test_the_package_does_not_ship_the_generator():
    assert not (ROOT / "npu_ft" / "launch" / "recipes.py").exists()
    assert GENERATOR.ROOT == ROOT


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shipped_recipe_trusts_remote_code(path, monkeypatch):
    """Qwen2.5/Qwen3 need no code from the model folder: no recipe may turn trust_remote_code on."""
    monkeypatch.chdir(ROOT)
    assert "trust_remote_code" not in yaml.safe_load(path.read_text())
    assert "trust_remote_code" not in path.read_text()
    data = yaml.safe_load(path.read_text())
    if "export_dir" not in data and not path.name.startswith("chat"):  # export / chat recipes: not training configs
        assert load_config(path).trust_remote_code is False


def test_every_size_and_method_is_there():
    have = {(r.model.key, r.method) for r in RECIPES}
    for model in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b",
                  "qwen3-0.6b", "qwen3-8b", "qwen3-32b"):
        for method in ("lora", "qlora", "full"):
            assert (model, method) in have
            assert (ROOT / "recipes" / model / f"{method}.yaml").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.path)
def test_recipe_loads_and_passes_the_launch_checks(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)  # deepspeed paths are relative to the working directory, as in LLaMA-Factory
    cfg = load_config(ROOT / recipe.path)
    assert cfg.method == recipe.method and cfg.bf16 and cfg.gradient_checkpointing_enabled
    assert cfg.template == recipe.model.template
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 16
    if recipe.zero:
        pytest.importorskip("deepspeed")
        ds = check_launch(cfg)
        assert zero_stage(ds) == recipe.zero_stage
    else:
        assert cfg.deepspeed is None
    cards, est = recipe.estimate_cards()
    assert cards is not None and est.total_gib <= 64 * 0.9


@pytest.mark.parametrize("model", GENERATOR.MODELS_TABLE, ids=lambda m: m.key)
def test_merge_and_chat_recipes_follow_the_training_recipes(model):
    """merge_<m>.yaml merges what <m>.yaml trained; chat_<m>.yaml talks to it; every key is one that
    `npu-ft export` / `npu-ft chat` reads."""
    from npu_ft.config import OPTIONS
    from npu_ft.config.chat_args import ChatArguments
    from npu_ft.config.schema import parse_fields
    from npu_ft.train.export import EXPORT_KEYS

    folder = ROOT / "recipes" / model.key
    trained = {m: yaml.safe_load((folder / f"{m}.yaml").read_text()) for m in METHOD_NAMES}
    for method in ("lora", "qlora"):
        merge = yaml.safe_load((folder / f"merge_{method}.yaml").read_text())
        assert set(merge) <= set(EXPORT_KEYS) | set(OPTIONS)
        assert merge["model_name_or_path"] == trained[method]["model_name_or_path"]
        assert merge["adapter_name_or_path"] == trained[method]["output_dir"]
        assert merge.get("quantization_bit") == trained[method].get("quantization_bit")
        assert merge["export_dir"] != merge["adapter_name_or_path"] and merge["template"] == model.template
    for method in ("lora", "full"):
        chat = yaml.safe_load((folder / f"chat_{method}.yaml").read_text())
        keys = {k: v for k, v in chat.items() if k != "infer_backend"}  # LLaMA-Factory's key, ignored by npu-ft
        values = parse_fields(ChatArguments, keys, "chat.yaml", {})
        if method == "full":
            assert values["model_name_or_path"] == trained["full"]["output_dir"]
        else:
            assert values["adapter_name_or_path"] == [trained["lora"]["output_dir"]]
            assert values["model_name_or_path"] == trained["lora"]["model_name_or_path"]


METHOD_NAMES = ("lora", "qlora", "full")


@pytest.mark.parametrize("name, stage, offload", [("ds_z2_config.json", 2, (False, False)),
                                                  ("ds_z3_config.json", 3, (False, False)),
                                                  ("ds_z3_offload_config.json", 3, (True, True))])
def test_deepspeed_configs(name, stage, offload):
    ds = json.loads((ROOT / "recipes" / "deepspeed" / name).read_text())
    assert zero_stage(ds) == stage and zero_offload(ds) == offload
    # everything the recipe decides is "auto", so HF's integration fills it from the recipe
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"


def test_deepspeed_configs_are_accepted_by_transformers(monkeypatch):
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    for name in ("ds_z2_config.json", "ds_z3_config.json", "ds_z3_offload_config.json"):
        cfg = HfTrainerDeepSpeedConfig(str(ROOT / "recipes" / "deepspeed" / name))
        assert cfg.is_zero3() == ("z3" in name)


@pytest.mark.parametrize("name, billions", [("qwen2.5-0.5b", 0.49), ("qwen2.5-1.5b", 1.54), ("qwen2.5-7b", 7.62),
                                            ("qwen2.5-14b", 14.77), ("qwen2.5-32b", 32.76), ("qwen2.5-72b", 72.71),
                                            ("qwen3-0.6b", 0.60), ("qwen3-8b", 8.19), ("qwen3-32b", 32.76)])
def test_model_shapes_match_the_published_parameter_counts(name, billions):
    assert MODELS[name].params / 1e9 == pytest.approx(billions, abs=0.01)
