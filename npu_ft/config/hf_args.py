"""``transformers.TrainingArguments`` from a recipe (the only place the trainer's arguments are built)."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from .schema import ConfigError
from .sft import OPTIONS, SftConfig
from .training_args import NOT_TRAINING_ARGUMENTS

__all__ = ["to_training_arguments"]


def to_training_arguments(cfg: SftConfig, **changes: Any):
    """``transformers.TrainingArguments`` from the ``training`` group (DeepSpeed left as given).

    LLaMA-Factory post-processing is applied: ``remove_unused_columns=False``, ``label_names=
    ['labels']`` for LoRA, gradient checkpointing is left off here (the trainer enables it on the
    model unless ``disable_gradient_checkpointing``), ``warmup_ratio`` becomes a fractional
    ``warmup_steps`` (transformers 5 dropped ``warmup_ratio``), ``device: cpu`` sets ``use_cpu``.
    ``changes`` override anything.
    """
    from transformers import TrainingArguments

    if cfg.deepspeed and "deepspeed" not in changes and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("DeepSpeed is configured but the deepspeed package is not installed "
                          "(pip install deepspeed, or remove the key)", source=cfg.source, key="deepspeed")
    hf_fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in cfg.group("training").items():
        info = OPTIONS[name]
        if info.status != "supported" or name in NOT_TRAINING_ARGUMENTS or name not in hf_fields:
            continue
        if value == info.default and not info.curated:
            continue  # leave transformers' own default
        kwargs[name] = value
    if not kwargs.get("warmup_steps") and cfg.warmup_ratio:
        # a float < 1 is read by transformers 5 as a fraction of the total steps
        kwargs["warmup_steps"] = min(float(cfg.warmup_ratio), 1.0 - 1e-12)
    kwargs["remove_unused_columns"] = False
    if cfg.finetuning_type == "lora":
        kwargs["label_names"] = ["labels"]
        if cfg.ddp_find_unused_parameters is None:  # LLaMA-Factory: every LoRA parameter gets a gradient
            kwargs["ddp_find_unused_parameters"] = False
    if cfg.device == "cpu":
        kwargs["use_cpu"] = True
    if kwargs.get("output_dir") is None:
        kwargs.pop("output_dir", None)
    kwargs.update(changes)
    return TrainingArguments(**kwargs)
