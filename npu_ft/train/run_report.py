"""What a run tells its user, as LLaMA-Factory does: the plan in the log before the first step
(device, dtype, parameters, batch and steps, which npu-ft kernels and fused paths are on, one decoded
training example) and a ``README.md`` model card in ``output_dir`` and every checkpoint."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from npu_ft.data.constants import IGNORE_INDEX

__all__ = ["MODEL_CARD", "describe_example", "kernel_summary", "log_run_plan", "model_card_text", "trainable_summary"]

logger = logging.getLogger("npu_ft.train")

MODEL_CARD = "README.md"


def trainable_summary(model: torch.nn.Module) -> str:
    """``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7314`` (LLaMA-Factory's line;
    a 4-bit packed weight counts as two parameters per byte)."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    for buffer in model.buffers():
        if buffer.dtype == torch.uint8 and buffer.dim() == 2 and buffer.shape[1] == 1:  # NF4 packed codes
            total += 2 * buffer.numel()
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"


def describe_example(item: dict[str, Any], tokenizer) -> str:
    """One training example as LLaMA-Factory prints it: ids, text, label ids and the learned text."""
    ids = list(item["input_ids"])
    labels = list(item["labels"])
    learned = [t for t in labels if t != IGNORE_INDEX]
    return (f"input_ids:\n{ids}\ninputs:\n{tokenizer.decode(ids, skip_special_tokens=False)}\n"
            f"label_ids:\n{labels}\nlabels:\n{tokenizer.decode(learned, skip_special_tokens=False)}")


def kernel_summary(model: torch.nn.Module, backend_name: str) -> list[str]:
    """Which npu-ft op serves the model's npu-ft layers on ``backend_name`` (the device's own kernel,
    or the pure-torch reference where it has none), with the number of layers."""
    from npu_ft.modules.lora import LoraLinear
    from npu_ft.modules.nf4 import Nf4Linear
    from npu_ft.ops._registry import REGISTERED

    used: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            op = "nf4_linear" if isinstance(module.base_layer, Nf4Linear) else "lora_linear"
        elif isinstance(module, Nf4Linear) and not name.endswith(".base_layer"):
            op = "nf4_linear"
        else:
            continue
        used[op] = used.get(op, 0) + 1
    lines = []
    for op, count in sorted(used.items()):
        kernel = backend_name if backend_name in REGISTERED.get(op, ()) else "reference"
        lines.append(f"npu_ft::{op}: {count} layers, {kernel} kernel")
    return lines


def log_run_plan(cfg: Any, model: torch.nn.Module, backend: Any, device: torch.device, dtype: torch.dtype,
                 world_size: int, total_steps: int, train_examples: Sequence[dict[str, Any]], tokenizer,
                 features: Sequence[str]) -> None:
    """Log what the run is about to do (INFO)."""
    batch = int(cfg.per_device_train_batch_size) * int(cfg.gradient_accumulation_steps) * world_size
    logger.info("device: %s (%s) x %d process(es), dtype %s, method %s", device, backend.device_name(), world_size,
                str(dtype).replace("torch.", ""), cfg.method)
    logger.info(trainable_summary(model))
    logger.info("%d training examples; effective batch size %d (%d per device x %d accumulation x %d processes); "
                "%d optimizer steps", len(train_examples), batch, cfg.per_device_train_batch_size,
                cfg.gradient_accumulation_steps, world_size, total_steps)
    for line in kernel_summary(model, backend.name):
        logger.info(line)
    if features:
        logger.info("npu-ft features: %s", ", ".join(features))
    if train_examples:
        logger.info("training example:\n%s", describe_example(train_examples[0], tokenizer))


def model_card_text(cfg: Any, log_history: Sequence[dict[str, Any]] = (), world_size: int = 1) -> str:
    """A ``README.md`` for the trained model or adapter (front matter as the Hugging Face hub reads it)."""
    from npu_ft.env_info import package_versions

    adapter = cfg.method != "full"
    base = str(cfg.model_name_or_path)
    datasets = ", ".join(cfg.dataset or [])
    losses = [rec["loss"] for rec in log_history if "loss" in rec]
    evals = [rec["eval_loss"] for rec in log_history if "eval_loss" in rec]
    versions = package_versions(("npu-ft", "transformers", "torch", "torch_npu", "peft"))
    lines = ["---", f"library_name: {'peft' if adapter else 'transformers'}", f"base_model: {base}", "tags:",
             "- npu-ft", "- llama-factory", f"- {cfg.method}", "- generated_from_trainer", "---", "",
             f"# {os.path.basename(os.path.normpath(str(cfg.output_dir)))}", "",
             f"A {'LoRA adapter for' if adapter else 'fine-tuned version of'} `{base}`, trained with npu-ft "
             f"({cfg.method}, supervised fine-tuning) on: {datasets or '-'} (template `{cfg.template}`).", "",
             "## Training hyperparameters", ""]
    steps = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.num_train_epochs:g} epochs"
    rows = [("learning_rate", cfg.learning_rate), ("per_device_train_batch_size", cfg.per_device_train_batch_size),
            ("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
            ("total_train_batch_size",
             cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size),
            ("optimizer", cfg.optim), ("lr_scheduler_type", cfg.lr_scheduler_type), ("training", steps),
            ("cutoff_len", cfg.cutoff_len), ("seed", cfg.seed),
            ("bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "dtype", True if cfg.bf16 or cfg.fp16 else "float32")]
    if adapter:
        rows += [("lora_rank", cfg.lora_rank), ("lora_alpha", cfg.lora_alpha), ("lora_dropout", cfg.lora_dropout),
                 ("lora_target", ",".join(cfg.lora_target))]
        if cfg.method == "qlora":
            rows.append(("quantization", "NF4 base (bitsandbytes format), double quantization "
                                         f"{'on' if cfg.double_quantization else 'off'}"))
    lines += [f"- {name}: {value}" for name, value in rows]
    if losses or evals:
        lines += ["", "## Results", ""]
        if losses:
            lines.append(f"- training loss: {losses[0]:.4f} (first logged) -> {losses[-1]:.4f} (last logged)")
        if evals:
            lines.append(f"- eval loss: {evals[-1]:.4f}")
    lines += ["", "## Framework versions", ""]
    lines += [f"- {name} {version}" for name, version in versions.items() if version]
    return "\n".join(lines) + "\n"
