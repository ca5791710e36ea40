"""Method keys of a recipe: the stage, the fine-tuning type and LoRA's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .schema import config_field, not_yet

__all__ = ["MethodArguments"]


@dataclass
class MethodArguments:
    """What trains and how (LLaMA-Factory's ``FinetuningArguments`` that npu-ft honours)."""

    GROUP = "method"

    stage: Literal["sft"] = config_field("sft", "Training stage; npu-ft implements supervised fine-tuning.",
                                         unsupported_values=not_yet("stage", "pt", "rm", "ppo", "dpo", "kto"))
    finetuning_type: Literal["lora", "full"] = config_field(
        "lora", "lora (also QLoRA with quantization_bit: 4) or full.",
        unsupported_values=not_yet("finetuning_type", "freeze", "oft"))
    lora_target: list[str] = config_field(
        doc="Modules that get LoRA: 'all' = every nn.Linear except the output head, or a comma list of "
            "module-name suffixes (q_proj,v_proj,...).", default_factory=lambda: ["all"])
    lora_rank: int = config_field(8, "LoRA rank r.", minimum=1)
    lora_alpha: int | None = config_field(None, "LoRA alpha; default 2 x lora_rank.", minimum=1)
    lora_dropout: float = config_field(0.0, "Dropout on the LoRA input.", minimum=0.0, maximum=1.0,
                                       exclusive_maximum=True)
    additional_target: list[str] | None = config_field(
        None, "Extra modules trained in full and saved with the adapter (PEFT modules_to_save), comma list.")
    use_rslora: bool = config_field(False, "Rank-stabilised scaling alpha / sqrt(r).")
    loraplus_lr_ratio: float | None = config_field(None, "LoRA+: learning rate of B = ratio x lr.", minimum=0.0,
                                                   exclusive_minimum=True)
    loraplus_lr_embedding: float = config_field(1e-06, "LoRA+ learning rate of embedding adapters.", minimum=0.0)
    disable_shuffling: bool = config_field(False, "Keep the training set in order.")
    plot_loss: bool = config_field(False, "Write training_loss.png at the end.")
    include_effective_tokens_per_second: bool = config_field(
        False, "Report effective (non-padding) tokens per second.")
