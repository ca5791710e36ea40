"""Method keys of a recipe: the stage, the fine-tuning type and the LoRA family's settings (LoRA, QLoRA,
DoRA, PiSSA, LoRA-FA, VeRA, rsLoRA, LoRA+; docs/methods.md explains each)."""

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
    finetuning_type: Literal["lora", "full", "vera"] = config_field(
        "lora", "lora (also QLoRA with quantization_bit: 4; DoRA, PiSSA, LoRA-FA by the keys below), full, or vera "
                "(an npu-ft value: PEFT's VeRA, see the vera_ keys).",
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
    use_dora: bool = config_field(
        False, "DoRA: weight-decomposed LoRA (a trainable magnitude per output row, PEFT use_dora); LoRA and QLoRA.")
    pissa_init: bool = config_field(
        False, "PiSSA: initialize A and B from the principal singular components of each base weight (the base keeps "
               "the residual); dense bases only.")
    pissa_iter: int = config_field(
        16, "PiSSA: subspace iterations of the fast SVD (torch.svd_lowrank); -1 = exact SVD. Used with pissa_init.",
        minimum=-1)
    pissa_convert: bool = config_field(
        False, "PiSSA: also save the trained adapter as a plain LoRA of the original weights (rank 2r) in "
               "output_dir/pissa_converted; the initial adapter goes to output_dir/pissa_init.")
    lora_fa: bool = config_field(
        False, "LoRA-FA: freeze lora_A after its initialization and train only lora_B; the fused op then keeps "
               "x @ A^T (r values per token) instead of x for backward.", own=True)
    vera_rank: int = config_field(256, "VeRA: rank r of the shared random projections (finetuning_type: vera).",
                                  minimum=1, own=True)
    vera_d_initial: float = config_field(0.1, "VeRA: initial value of every lambda_d (PEFT d_initial).", own=True)
    vera_projection_prng_key: int = config_field(
        0, "VeRA: seed of the shared random A and B (PEFT projection_prng_key).", minimum=0, own=True)
    vera_save_projection: bool = config_field(
        True, "VeRA: store A and B in the adapter file (PEFT save_projection); false regenerates them from the seed.",
        own=True)
    loraplus_lr_ratio: float | None = config_field(None, "LoRA+: learning rate of B = ratio x lr.", minimum=0.0,
                                                   exclusive_minimum=True)
    loraplus_lr_embedding: float = config_field(1e-06, "LoRA+ learning rate of embedding adapters.", minimum=0.0)
    disable_shuffling: bool = config_field(False, "Keep the training set in order.")
    plot_loss: bool = config_field(False, "Write training_loss.png at the end.")
    include_effective_tokens_per_second: bool = config_field(
        False, "Report effective (non-padding) tokens per second.")
