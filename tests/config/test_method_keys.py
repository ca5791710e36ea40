"""The LoRA family's keys (use_dora, pissa_*, lora_fa, finetuning_type: vera and the vera_ keys):
typed values, defaults, and one-line errors naming the key for bad values and bad combinations."""

from __future__ import annotations

import pytest

from npu_ft.config import ConfigError, build_config


def cfg(**keys):
    return build_config({"model_name_or_path": "m", **keys}, source="recipe.yaml",
                        sources={k: "recipe.yaml" for k in keys})


def test_defaults_and_types():
    c = cfg(use_dora="true", pissa_init=True, pissa_iter="4", lora_fa="yes")
    assert (c.use_dora, c.pissa_init, c.pissa_iter, c.lora_fa, c.pissa_convert) == (True, True, 4, True, False)
    v = cfg(finetuning_type="vera", vera_rank=64, vera_d_initial=0.05, vera_projection_prng_key=3)
    assert (v.method, v.vera_rank, v.vera_d_initial, v.vera_projection_prng_key, v.vera_save_projection) == (
        "vera", 64, 0.05, 3, True)
    assert cfg(use_dora=True, quantization_bit=4).method == "qlora"
    assert cfg(finetuning_type="vera", quantization_bit=4).method == "vera"


@pytest.mark.parametrize("keys, key, words", [
    ({"pissa_iter": -2}, "pissa_iter", ">= -1"),
    ({"vera_rank": 0, "finetuning_type": "vera"}, "vera_rank", ">= 1"),
    ({"vera_projection_prng_key": -1, "finetuning_type": "vera"}, "vera_projection_prng_key", ">= 0"),
    ({"use_dora": "maybe"}, "use_dora", "true or false"),
    ({"finetuning_type": "full", "use_dora": True}, "use_dora", "only valid for finetuning_type: lora"),
    ({"finetuning_type": "full", "lora_fa": True}, "lora_fa", "only valid for finetuning_type: lora"),
    ({"finetuning_type": "full", "pissa_init": True}, "pissa_init", "only valid for finetuning_type: lora"),
    ({"finetuning_type": "vera", "use_dora": True}, "use_dora", "only valid for finetuning_type: lora"),
    ({"finetuning_type": "vera", "use_rslora": True}, "use_rslora", "only valid for finetuning_type: lora"),
    ({"finetuning_type": "vera", "loraplus_lr_ratio": 16}, "loraplus_lr_ratio", "only valid for finetuning_type"),
    ({"finetuning_type": "vera", "lora_rank": 16}, "lora_rank", "vera_rank"),
    ({"finetuning_type": "vera", "lora_alpha": 16}, "lora_alpha", "no alpha"),
    ({"vera_rank": 128}, "vera_rank", "only valid for finetuning_type: vera"),
    ({"finetuning_type": "full", "quantization_bit": 4}, "quantization_bit", "lora or vera"),
    ({"pissa_init": True, "quantization_bit": 4}, "pissa_init", "quantized"),
    ({"pissa_convert": True}, "pissa_convert", "pissa_init: true"),
    ({"pissa_convert": True, "pissa_init": True, "use_dora": True}, "pissa_convert", "DoRA"),
    ({"lora_fa": True, "loraplus_lr_ratio": 16}, "loraplus_lr_ratio", "lora_fa freezes lora_A"),
])
def test_bad_values_and_combinations_name_the_key(keys, key, words):
    with pytest.raises(ConfigError) as info:
        cfg(**keys)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("recipe.yaml") and f"'{key}'" in msg and words in msg, msg


@pytest.mark.parametrize("keys", [
    {"use_dora": True, "quantization_bit": 4},
    {"use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 16},
    {"use_dora": True, "pissa_init": True, "lora_fa": True},
    {"pissa_init": True, "pissa_iter": -1, "pissa_convert": True, "use_rslora": True},
    {"lora_fa": True, "quantization_bit": 4, "lora_dropout": 0.1},
    {"finetuning_type": "vera", "quantization_bit": 4, "lora_dropout": 0.1, "additional_target": "norm"},
])
def test_combinations_peft_trains_are_accepted(keys):
    cfg(**keys)
