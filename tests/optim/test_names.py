"""transformers' ``optim`` names -> npu-ft optimizers, and the Trainer's 32-bit embedding rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from npu_ft.optim import (
    AdamW8bit,
    PagedAdamW8bit,
    PagedAdamW32bit,
    create_optimizer,
    is_npu_ft_optim,
    resolve_optim,
)


@pytest.mark.parametrize(
    "name,cls,bits,paged",
    [
        ("adamw_8bit", AdamW8bit, 8, False),
        ("adamw_bnb_8bit", AdamW8bit, 8, False),
        ("paged_adamw_8bit", PagedAdamW8bit, 8, True),
        ("paged_adamw_32bit", PagedAdamW32bit, 32, True),
        (" Paged_AdamW_8bit ", PagedAdamW8bit, 8, True),
    ],
)
def test_names_map_to_classes(name, cls, bits, paged):
    from transformers.training_args import OptimizerNames

    assert is_npu_ft_optim(name)
    assert resolve_optim(name)[0] is cls
    # TrainingArguments.optim holds the enum member, whose str() is 'OptimizerNames.ADAMW_8BIT'
    member = OptimizerNames(name.strip().lower())
    assert is_npu_ft_optim(member) and resolve_optim(member)[0] is cls
    opt = create_optimizer(name, [nn.Parameter(torch.zeros(3))], lr=1e-3)
    assert type(opt) is cls and opt.optim_bits == bits and opt.paged is paged


def test_transformers_names_npu_ft_does_not_build():
    for name in ("adamw_torch", "adamw_torch_fused", "adafactor", "lion_8bit", "paged_lion_8bit"):
        assert not is_npu_ft_optim(name)
    with pytest.raises(ValueError, match="optim: 'adamw_torch' is not an npu-ft optimizer"):
        resolve_optim("adamw_torch")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)  # 6400 elements: 8-bit by size
        self.proj = nn.Linear(64, 100, bias=False)


def test_embeddings_keep_32bit_states_like_transformers():
    model = _Tiny()
    groups = [{"params": [model.embed.weight, model.proj.weight], "weight_decay": 0.1}]
    opt = create_optimizer("adamw_8bit", groups, lr=1e-3, weight_decay=0.0, model=model)
    assert opt.param_groups[0]["weight_decay"] == 0.1  # the group's own setting wins
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[model.embed.weight]["state1"].dtype == torch.float32
    assert opt.state[model.proj.weight]["state1"].dtype == torch.uint8

    opt = create_optimizer("adamw_8bit", model.parameters(), lr=1e-3, model=model, embedding_fp32_states=False)
    opt.step()
    assert opt.state[model.embed.weight]["state1"].dtype == torch.uint8


def test_bad_hyperparameters_name_the_key():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW8bit(p, lr=-1.0)
    with pytest.raises(ValueError, match="optim_bits"):
        AdamW8bit(p, optim_bits=4)


@pytest.mark.parametrize("name,cls", [("adamw_8bit", AdamW8bit), ("paged_adamw_32bit", PagedAdamW32bit)])
def test_transformers_trainer_builds_npu_ft_optimizers(tmp_path, name, cls):
    """What the trainer integration does: Trainer(optimizer_cls_and_kwargs=trainer_optimizer(...))."""
    from transformers import Trainer, TrainingArguments

    from npu_ft.optim import trainer_optimizer

    model = _Tiny()
    args = TrainingArguments(output_dir=str(tmp_path), optim=name, learning_rate=3e-4, adam_beta1=0.8,
                             adam_beta2=0.99, adam_epsilon=1e-7, weight_decay=0.1, use_cpu=True, report_to=[])
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=trainer_optimizer(name, args, model))
    opt = trainer.create_optimizer()
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (3e-4, (0.8, 0.99), 1e-7)
    assert {g["weight_decay"] for g in opt.param_groups} <= {0.1, 0.0}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[model.embed.weight]["state1"].dtype == torch.float32
    assert opt.state[model.proj.weight]["state1"].dtype == (torch.uint8 if cls is AdamW8bit else torch.float32)
