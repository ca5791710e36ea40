"""Training keys of a recipe that npu-ft documents and checks itself (``transformers``'
``TrainingArguments`` names, LLaMA-Factory defaults). Every other ``TrainingArguments`` field is
passed through unchanged (:mod:`npu_ft.config.hf_fields`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .schema import NOT_YET, config_field

__all__ = ["NOT_TRAINING_ARGUMENTS", "TrainingKeys"]

#: training keys that are LLaMA-Factory/npu-ft concepts, not ``TrainingArguments`` fields
NOT_TRAINING_ARGUMENTS = frozenset({"overwrite_output_dir", "warmup_ratio", "gradient_checkpointing"})


@dataclass
class TrainingKeys:
    """The curated training keys (LLaMA-Factory recipes' ``### train`` and ``### output`` blocks)."""

    GROUP = "training"

    output_dir: str | None = config_field(None, "Where checkpoints, the adapter and logs go.")
    overwrite_output_dir: bool = config_field(False, "Allow writing into a non-empty output_dir.")
    do_train: bool = config_field(False, "Run training (LLaMA-Factory recipes set true).")
    do_eval: bool = config_field(False, "Run evaluation.")
    per_device_train_batch_size: int = config_field(8, "Micro-batch size per device.", minimum=1)
    per_device_eval_batch_size: int = config_field(8, "Eval batch size per device.", minimum=1)
    gradient_accumulation_steps: int = config_field(1, "Micro-batches per optimizer step.", minimum=1)
    learning_rate: float = config_field(5e-05, "Peak learning rate.", minimum=0.0, exclusive_minimum=True)
    num_train_epochs: float = config_field(3.0, "Epochs (ignored when max_steps > 0).", minimum=0.0)
    max_steps: int = config_field(-1, "Total optimizer steps; -1 = from epochs.", minimum=-1)
    lr_scheduler_type: str = config_field("linear", "Learning-rate schedule (transformers names).")
    warmup_ratio: float = config_field(0.0, "Warm-up as a fraction of total steps.", minimum=0.0, maximum=1.0)
    warmup_steps: float = config_field(0, "Warm-up steps (wins over warmup_ratio when > 0).", minimum=0.0)
    weight_decay: float = config_field(0.0, "AdamW weight decay.", minimum=0.0)
    optim: str = config_field("adamw_torch", "Optimizer (transformers names).")
    max_grad_norm: float = config_field(1.0, "Gradient clipping norm (0 = off).", minimum=0.0)
    bf16: bool = config_field(False, "bf16 mixed precision.")
    fp16: bool = config_field(False, "fp16 mixed precision.")
    logging_steps: float = config_field(500, "Log every N steps.", minimum=0.0, exclusive_minimum=True)
    save_steps: float = config_field(500, "Checkpoint every N steps.", minimum=0.0, exclusive_minimum=True)
    save_strategy: Literal["no", "steps", "epoch", "best"] = config_field("steps", "When to checkpoint.")
    save_total_limit: int | None = config_field(None, "Keep at most N checkpoints.", minimum=1)
    save_only_model: bool = config_field(False, "Checkpoints without optimizer state.")
    seed: int = config_field(42, "Random seed.", minimum=0)
    deepspeed: str | dict[str, Any] | None = config_field(None, "DeepSpeed config (path to JSON or a dict).")
    resume_from_checkpoint: Any = config_field(
        None, "Checkpoint folder to resume from, or true for the latest checkpoint-N in output_dir.")
    report_to: list[str] = config_field(doc="Experiment trackers (none, tensorboard, wandb, ...).",
                                        default_factory=lambda: ["none"])
    ddp_timeout: int = config_field(1800, "Distributed timeout in seconds.", minimum=1)
    dataloader_num_workers: int = config_field(0, "DataLoader worker processes.", minimum=0)
    eval_strategy: Literal["no", "steps", "epoch"] = config_field("no", "When to evaluate.")
    eval_steps: float | None = config_field(None, "Evaluate every N steps.", minimum=0.0, exclusive_minimum=True)
    gradient_checkpointing: bool | None = config_field(
        None, "Ignored in favour of disable_gradient_checkpointing (LLaMA-Factory semantics).")
    predict_with_generate: bool = config_field(
        False, "With do_predict: generate an answer per eval prompt, write generated_predictions.jsonl and "
               "BLEU-4 / ROUGE to predict_results.json (needs the metrics extra).")
    save_safetensors: bool = config_field(
        True, "Checkpoints are always safetensors.",
        unsupported_values={False: f"save_safetensors: false (pickle checkpoints) is {NOT_YET}"})
