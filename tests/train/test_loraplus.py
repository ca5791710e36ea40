"""LoRA+ parameter groups (npu_ft.train.loraplus) against PEFT's ``create_loraplus_optimizer`` on the
same adapters: LoRA, DoRA (the 1-D magnitude goes with lora_B, as in PEFT and LLaMA-Factory) with a
trained norm (modules_to_save), and the optimizer that ``optim`` selects."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from npu_ft.model import model_from_config, tiny_config
from npu_ft.modules.inject import apply_lora
from npu_ft.train.loraplus import create_loraplus_optimizer, loraplus_param_groups

from ._method_helpers import normalize

peft = pytest.importorskip("peft")


def _peft_groups(model, lr, ratio):
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    opt = peft_loraplus(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=0.0)
    names = {id(p): normalize(n) for n, p in model.named_parameters()}
    return {(names[id(p)], g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("use_dora", [False, True])
def test_groups_equal_peft_s(use_dora):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = model_from_config(tiny_config("qwen2", vocab=256), seed=0)
        ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, use_dora=use_dora, target_modules=["q_proj", "down_proj"], modules_to_save=["norm"]))
    ours = apply_lora(copy.deepcopy(base), "q_proj,down_proj", r=4, alpha=8, use_dora=use_dora,
                      additional_target="norm")
    groups = loraplus_param_groups(ours, learning_rate=1e-4, weight_decay=0.0, loraplus_lr_ratio=16)
    got = {(n, g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert got == _peft_groups(ref, 1e-4, 16)
    b_group = next(g for g in groups if g["lr"] == pytest.approx(16e-4) and g["weight_decay"] == 0.0)
    if use_dora:
        assert any(n.endswith("lora_magnitude_vector") for g in groups if g["lr"] > 1e-4 for n in g["names"])
    assert any("norm" in n for n in b_group["names"])


def test_optimizer_follows_optim_and_weight_decay(tmp_path):
    from transformers import TrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_lora(model_from_config(tiny_config("qwen2", vocab=256), seed=0), "q_proj", r=4)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=2e-4, weight_decay=0.1, optim="adamw_torch",
                             use_cpu=True, report_to="none")
    opt = create_loraplus_optimizer(model, args, loraplus_lr_ratio=8)
    assert type(opt) is torch.optim.AdamW
    lrs = sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups if g["params"])
    assert lrs == [(2e-4, 0.1, 2), (pytest.approx(1.6e-3), 0.1, 2)]
