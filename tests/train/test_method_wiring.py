"""run_sft wires the LoRA family's training pieces: LoRA+ parameter groups (also with npu-ft's own
8-bit AdamW), PiSSA's conversion at the end of training, and one-line errors naming the key."""

from __future__ import annotations

import json

import pytest

from npu_ft.config import build_config
from npu_ft.train.run import TrainingError, run_sft
from tests.train._sft_helpers import base_recipe, tiny_model_dir, write_dataset


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wiring")
    return {"root": root, "model": tiny_model_dir(root), "data": write_dataset(root / "data")}


def _run(env, name, **overrides):
    cfg = build_config(base_recipe(env["model"], env["data"], env["root"] / name, max_steps=2, save_steps=100,
                                   **overrides), source=f"{name}.yaml")
    return cfg, run_sft(cfg)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit"])
def test_loraplus_groups_reach_the_optimizer(env, optim):
    from npu_ft.optim import AdamW8bit

    _, result = _run(env, f"loraplus-{optim}", loraplus_lr_ratio=16.0, optim=optim)
    optimizer = result.trainer.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    assert isinstance(inner, AdamW8bit) == (optim == "adamw_8bit")
    names = {id(p): n for n, p in result.model.named_parameters()}
    base_lr = {g["initial_lr"] for g in inner.param_groups if any("lora_A" in names[id(p)] for p in g["params"])}
    b_lr = {g["initial_lr"] for g in inner.param_groups if any("lora_B" in names[id(p)] for p in g["params"])}
    assert base_lr == {1e-3} and b_lr == {16e-3}


def test_pissa_convert_writes_a_plain_lora_adapter_at_the_end(env):
    cfg, _ = _run(env, "pissa", pissa_init=True, pissa_iter=-1, pissa_convert=True, lora_alpha=8)
    out = env["root"] / "pissa"
    for folder in ("pissa_init", "pissa_converted"):
        config = json.loads((out / folder / "adapter_config.json").read_text())
        assert (out / folder / "adapter_model.safetensors").is_file()
    assert config["init_lora_weights"] is True and config["r"] == 2 * cfg.lora_rank  # PEFT's converted rank


def test_method_errors_name_their_key(env):
    from types import SimpleNamespace

    from npu_ft.config import ConfigError
    from npu_ft.train.model_setup import _method_error_key

    with pytest.raises(ConfigError, match="key 'vera_rank'"):
        build_config(base_recipe(env["model"], env["data"], env["root"] / "vera-bad", finetuning_type="vera",
                                 vera_rank=0), source="vera.yaml")
    # what the model-side checks say, mapped to the recipe key a user edits
    assert _method_error_key(SimpleNamespace(method="vera"), "r: must be a positive integer") == "vera_rank"
    assert _method_error_key(SimpleNamespace(method="lora"), "r: PiSSA rank 64 exceeds") == "lora_rank"
    assert _method_error_key(SimpleNamespace(method="qlora"), "quantization_type: only nf4") == "quantization_type"
    # a rank larger than a targeted layer's smaller side is refused before training, naming the key
    cfg = build_config(base_recipe(env["model"], env["data"], env["root"] / "pissa-bad", pissa_init=True,
                                   pissa_iter=-1, lora_rank=4096), source="pissa.yaml")
    with pytest.raises((TrainingError, ConfigError), match="lora_rank"):
        run_sft(cfg)
