"""``run_sft(cfg)``: one supervised fine-tuning run, in LLaMA-Factory's order.

device (device layer) -> tokenizer -> dataset -> model -> method (lora | qlora | full) -> fused
linear cross-entropy loss (``fused_cross_entropy``, default on) ->
:class:`~npu_ft.train.trainer.SftTrainer` (transformers' Trainer) -> outputs.

Everything that can be wrong with the inputs (config, device, tokenizer, data files, the model
folder) is checked *before* anything is written, so a bad recipe leaves no output behind. Outputs
in ``output_dir`` (as LLaMA-Factory writes them):

* LoRA / QLoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) + tokenizer.
* full: ``model.safetensors`` + ``config.json`` + ``generation_config.json`` + tokenizer.
* always: ``trainer_log.jsonl``, ``trainer_state.json``, ``train_results.json``,
  ``all_results.json``, ``checkpoint-N/`` every ``save_steps``, ``training_loss.png`` with
  ``plot_loss: true``.

The final model is written into a temp folder and its files moved into ``output_dir`` one rename
each, so an interrupted save never leaves a half-written weights file. What a run guarantees about
its outputs (run identity, overwrite, never past the end, file modes, no pickle, faults) is listed
in docs/training.md ("Guarantees").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .callbacks import LogCallback, NonFiniteLossError, NonFiniteLossGuard, plot_loss
from .checkpoint import (
    CheckpointError,
    check_resumable,
    checkpoint_step,
    latest_checkpoint,
    parse_resume,
    remove_stale_tmp,
    resolve_resume,
)
from .outputs import OutputDirError, check_output_dir, is_disk_full, publish_folder
from .previous_run import is_run_file, set_aside_previous_run
from .run_identity import RUN_FILE, RunIdentity, check_same_run, compute_identity, snapshot_files, write_run_file

logger = logging.getLogger(__name__)

__all__ = ["SftResult", "TrainingError", "build_data_arguments", "enable_fused_loss", "prepare_model", "run_sft"]

#: files whose presence means "a model/adapter was already trained here" (LF's CHECKPOINT_NAMES)
_OUTPUT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", "trainer_state.json")


class TrainingError(RuntimeError):
    """A run cannot start (or had to stop); the message says why and what to change."""


@dataclass
class SftResult:
    """What :func:`run_sft` did."""

    output_dir: str
    method: str
    metrics: dict[str, Any] = field(default_factory=dict)
    global_step: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    #: the resumed checkpoint was already at the end of training: no step ran, the final model was
    #: written from it
    already_finished: bool = False
    device: str = "cpu"
    #: the trained model (LoRA modules still injected) and the trainer, for in-process callers
    model: Any = field(default=None, repr=False)
    trainer: Any = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------
def build_data_arguments(cfg: Any):
    """:class:`npu_ft.data.DataArguments` from the data keys of a config."""
    from npu_ft.data import DataArguments

    kwargs = {}
    for f in dataclasses.fields(DataArguments):
        if f.name in cfg:
            value = cfg.get(f.name)
            if value is None and f.default is not None and f.default is not dataclasses.MISSING:
                continue
            kwargs[f.name] = value
    return DataArguments(**kwargs)


def load_tokenizer(cfg: Any):
    """The tokenizer saved in the model folder (LLaMA-Factory loads it from model_name_or_path)."""
    from transformers import AutoTokenizer

    from npu_ft.model.loading import resolve_model_path

    folder = resolve_model_path(cfg.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=bool(cfg.get("trust_remote_code", False)),
            use_fast=bool(cfg.get("use_fast_tokenizer", True)),
        )
    except (OSError, ValueError, TypeError) as exc:
        raise TrainingError(f"model_name_or_path {cfg.model_name_or_path!r}: cannot load a tokenizer from the "
                            f"folder ({exc}). Put the tokenizer files next to the weights.") from exc
    tokenizer.padding_side = "right"
    return tokenizer


def prepare_model(cfg: Any, device: torch.device, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load the model and apply the method: LoRA, QLoRA (NF4 base) or full fine-tuning."""
    from npu_ft.model.loading import compute_dtype as _compute_dtype
    from npu_ft.model.loading import load_model
    from npu_ft.modules.inject import apply_lora, apply_qlora

    dtype = compute_dtype or _compute_dtype(cfg)
    model = load_model(cfg, device=None, dtype=dtype)
    method = cfg.method
    lora_kwargs = dict(r=int(cfg.lora_rank), alpha=cfg.lora_alpha, dropout=float(cfg.lora_dropout),
                       use_rslora=bool(cfg.use_rslora), additional_target=cfg.additional_target)
    try:
        if method == "lora":
            apply_lora(model, cfg.lora_target, **lora_kwargs)
        elif method == "qlora":
            if str(cfg.get("quantization_type", "nf4")).lower() != "nf4":
                raise TrainingError(f"quantization_type: only nf4 is supported, got {cfg.quantization_type!r}")
            model = model.to(device)  # quantize where we train (same NF4 codes on any device)
            apply_qlora(model, cfg.lora_target, double_quant=bool(cfg.double_quantization), compute_dtype=dtype,
                        **lora_kwargs)
        else:  # full: LLaMA-Factory trains fp32 master weights unless pure_bf16
            model.requires_grad_(True)
            if not cfg.get("pure_bf16", False):
                for param in model.parameters():
                    if param.dtype != torch.float32:
                        param.data = param.data.to(torch.float32)
    except ValueError as exc:
        key = next((k for k in ("lora_rank", "lora_target", "additional_target") if str(exc).startswith(k)),
                   "finetuning_type")
        raise TrainingError(f"{cfg.source}: key '{key}': {exc}") from exc
    model = model.to(device)
    model.config.use_cache = False
    if cfg.gradient_checkpointing_enabled:
        from npu_ft.modules.checkpointing import enable_gradient_checkpointing

        use_reentrant = bool(cfg.get("use_reentrant_gc", True))
        policy = cfg.get("gradient_checkpointing_policy", "full")
        enable_gradient_checkpointing(model, policy, use_reentrant,
                                      input_require_grads=method != "full" or use_reentrant)
        logger.info("gradient checkpointing: policy %s", policy)
    return model


def enable_fused_loss(cfg: Any, model: torch.nn.Module) -> bool:
    """``fused_cross_entropy: true`` (the default): patch the model's forward so its training loss is
    the chunked fused linear + cross-entropy (:mod:`npu_ft.modules.fused_loss`). Returns whether the
    model now uses it; what happened is logged once (here or by the patch)."""
    if not bool(cfg.get("fused_cross_entropy", True)):
        logger.info("fused_cross_entropy: false -> transformers' loss (full [tokens, vocab] logits)")
        return False
    from npu_ft.modules.fused_loss import enable_fused_cross_entropy

    # enable_fused_cross_entropy logs whether it applies (and why not): one line, not two
    return enable_fused_cross_entropy(model)


def _adapter_fns(cfg: Any, method: str):
    if method == "full":
        return None, None
    from npu_ft.train.adapter_io import load_adapter, save_adapter

    def _save(model, folder):
        save_adapter(model, folder, cfg, base_model_name_or_path=str(cfg.model_name_or_path))

    def _load(model, folder):
        load_adapter(model, folder, strict=True)

    return _save, _load


def _check_output_dir(cfg: Any, resume: str | None) -> str | None:
    """LLaMA-Factory's rule: a non-empty output_dir needs overwrite_output_dir unless it has a
    checkpoint to resume from (then training resumes from the latest one automatically)."""
    out = cfg.output_dir
    if not cfg.do_train or resume is not None or not os.path.isdir(out) or cfg.overwrite_output_dir:
        return resume
    last = latest_checkpoint(out)
    if last is None and any(os.path.isfile(os.path.join(out, n)) for n in _OUTPUT_NAMES):
        raise TrainingError(f"{cfg.source}: key 'output_dir': {out!r} already holds a trained model; set "
                            "overwrite_output_dir: true to train over it, or choose another output_dir")
    if last is not None:
        logger.info("Resuming training from %s (output_dir has checkpoints; overwrite_output_dir is false)", last)
    return last


def _publish_final(trainer, output_dir: str) -> None:
    """save_model into a temp folder, then move each file into output_dir (one rename per file)."""
    staging = os.path.join(output_dir, ".tmp-final-model")
    if trainer.args.should_save:  # only the writing rank: another rank would delete its files mid-save
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(staging)
    if trainer.args.should_save:
        publish_folder(staging, output_dir)


def _record_outputs(output_dir: str, identity: RunIdentity) -> None:
    """Rewrite output_dir's run file with the list of run files now there (all written by this run:
    a fresh run set the earlier ones aside, a resumed one is the same run)."""
    files = snapshot_files(output_dir)
    names = {n: v for n, v in files.items() if os.sep not in n and n != RUN_FILE and is_run_file(n)}
    write_run_file(output_dir, identity, names)


def _planned_steps(trainer) -> int:
    """The number of optimizer steps this run trains in total (transformers' own computation)."""
    return int(trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1])


def _finish_finished(cfg: Any, trainer, resume: str, step: int, total: int, identity: RunIdentity) -> None:
    """The resumed checkpoint is at the end: load it, write the final model from it, train nothing."""
    from transformers import TrainerState

    logger.warning("%s is already at the end of training (step %d of %d): no step to run; the final model in %s "
                   "is written from it", resume, step, total, cfg.output_dir)
    trainer._load_from_checkpoint(resume)
    trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
    _publish_final(trainer, cfg.output_dir)
    if trainer.args.should_save:
        if not os.path.isfile(os.path.join(cfg.output_dir, "trainer_state.json")):
            trainer.save_state()
        _record_outputs(cfg.output_dir, identity)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run_sft(cfg: Any, callbacks: Sequence[Any] | None = None, trainer_kwargs: dict[str, Any] | None = None
            ) -> SftResult:
    """Fine-tune as the recipe says; returns an :class:`SftResult`.

    Raises :class:`TrainingError` (bad inputs), :class:`~npu_ft.device.DeviceUnavailableError`,
    :class:`~npu_ft.train.config.ConfigError`, the data errors of :mod:`npu_ft.data`, or
    :class:`~npu_ft.train.callbacks.NonFiniteLossError` (loss became NaN/inf; the last good
    checkpoint is kept and named in the message).
    """
    from npu_ft.data import SFTDataCollator, build_sft_splits
    from npu_ft.device import select_device
    from npu_ft.model.loading import compute_dtype as _compute_dtype

    from .config import to_training_arguments
    from .trainer import SftTrainer

    if not cfg.do_train:
        raise TrainingError(f"{cfg.source}: key 'do_train': nothing to do (set do_train: true to train)")
    if not cfg.output_dir:
        raise TrainingError(f"{cfg.source}: key 'output_dir': is required")
    if cfg.get("stage", "sft") != "sft":
        raise TrainingError(f"{cfg.source}: key 'stage': only sft is supported, got {cfg.stage!r}")
    try:
        check_output_dir(cfg.output_dir, cfg.model_name_or_path)
    except OutputDirError as exc:
        raise TrainingError(f"{cfg.source}: key 'output_dir': {exc}") from None

    # 1. device (raises DeviceUnavailableError for a device asked for but absent)
    backend, device = select_device(None if cfg.device == "auto" else cfg.device)
    backend.set_device(device)
    if backend.name == "cpu" and bool(cfg.get("cpu_malloc_tuning", True)):
        from npu_ft.device.cpu import tune_glibc_malloc

        if tune_glibc_malloc():
            logger.info("cpu_malloc_tuning: glibc mmap/trim thresholds raised (per-step buffers are reused)")
    dtype = _compute_dtype(cfg)
    if dtype == torch.bfloat16 and not backend.supports_bf16():
        raise TrainingError(f"{cfg.source}: key 'bf16': {backend.name} ({backend.device_name()}) has no bf16")

    # 2. where to resume from (no writes yet): a complete checkpoint of this method
    asked = parse_resume(cfg.resume_from_checkpoint)
    # not asked: a checkpoint may still be picked from output_dir (LLaMA-Factory's rule); errors name output_dir
    resume_key = "output_dir" if asked is None else "resume_from_checkpoint"
    try:
        resume = _check_output_dir(cfg, resolve_resume(asked, cfg.output_dir))
        if resume is not None:
            check_resumable(resume, cfg.method)
    except CheckpointError as exc:
        raise TrainingError(f"{cfg.source}: key '{resume_key}': {exc}") from None

    # 3. tokenizer and data (every data error surfaces here, before any output exists)
    tokenizer = load_tokenizer(cfg)
    data_args = build_data_arguments(cfg)
    from npu_ft.data import DataFileError, DataFormatError, DatasetInfoError

    try:
        splits = build_sft_splits(data_args, tokenizer, seed=int(cfg.seed))
    except (DataFileError, DataFormatError, DatasetInfoError):
        raise
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        names = ",".join(data_args.dataset or [])
        raise TrainingError(f"{cfg.source}: key 'dataset' ({names} in {data_args.dataset_dir}): {exc}") from exc
    if not splits.train:
        raise TrainingError(f"{cfg.source}: key 'dataset': no training example left after processing")
    with_target = sum(1 for item in splits.train if any(label != -100 for label in item["labels"]))
    if with_target == 0:
        raise TrainingError(
            f"{cfg.source}: key 'cutoff_len': cutoff_len={cfg.cutoff_len} leaves no target token in any of the "
            f"{len(splits.train)} examples of dataset {','.join(data_args.dataset or [])} (the prompt uses the "
            "whole budget); raise cutoff_len")
    if with_target < len(splits.train):
        logger.warning("%d of %d training examples have no target token left after cutoff_len=%s",
                       len(splits.train) - with_target, len(splits.train), cfg.cutoff_len)

    # 3b. which run this is; a checkpoint of another run is refused
    identity = compute_identity(cfg)
    if resume is not None:
        try:
            check_same_run(resume, identity, automatic=not isinstance(asked, str))
        except CheckpointError as exc:
            raise TrainingError(f"{cfg.source}: key '{resume_key}': {exc}") from None

    # 4. model + method (seeded first, as LLaMA-Factory does, so LoRA init is reproducible)
    from transformers import set_seed

    set_seed(int(cfg.seed))
    model = prepare_model(cfg, device, dtype)
    trainer_kwargs = dict(trainer_kwargs or {})
    enable_fused_loss(cfg, model)

    # 5. trainer
    changes: dict[str, Any] = {"output_dir": cfg.output_dir}
    if backend.name == "cpu":
        changes["use_cpu"] = True
    changes.setdefault("disable_tqdm", False)
    if cfg.get("disable_shuffling", False):
        changes["train_sampling_strategy"] = "sequential"
    args = to_training_arguments(cfg, **changes)
    collator = SFTDataCollator(
        pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8, neat_packing=bool(cfg.neat_packing),
        compute_dtype=dtype,
    )
    save_adapter, load_adapter = _adapter_fns(cfg, cfg.method)
    guard = NonFiniteLossGuard()
    trainer = SftTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=tokenizer,
        callbacks=[LogCallback(), *(callbacks or [])],
        save_adapter=save_adapter,
        load_adapter=load_adapter,
        nan_guard=guard,
        run_identity=identity,
        method=cfg.method,
        **trainer_kwargs,
    )
    result = SftResult(output_dir=cfg.output_dir, method=cfg.method, resumed_from=resume, device=str(device))
    try:
        _train_and_save(cfg, trainer, resume, identity, splits, result)
    except Exception as exc:  # writers report a full disk as OSError, SafetensorError, or (tokenizers) Exception
        if isinstance(exc, (NonFiniteLossError, TrainingError)) or not is_disk_full(exc, cfg.output_dir):
            raise
        last = latest_checkpoint(cfg.output_dir)
        kept = f"the last complete checkpoint is {last}" if last else "no checkpoint had been saved"
        raise TrainingError(f"{cfg.source}: key 'output_dir': the disk is full (no space left on device) writing "
                            f"to {cfg.output_dir!r}: {_first_line(exc)}; {kept}. Free space, then run again to "
                            "resume") from None
    result.model, result.trainer = trainer.model, trainer
    return result


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _train_and_save(cfg: Any, trainer, resume: str | None, identity: RunIdentity, splits, result: SftResult) -> None:
    """Steps 6 and 7 of :func:`run_sft`: train (or see the run is finished), then write the outputs."""
    out = cfg.output_dir
    if resume is not None:
        step, total = checkpoint_step(resume), _planned_steps(trainer)
        if step > total:
            raise TrainingError(f"{cfg.source}: key 'resume_from_checkpoint': {resume} is at step {step}, past "
                                f"the end of this run ({total} steps)")
        if step == total:
            _finish_finished(cfg, trainer, resume, step, total, identity)
            result.global_step, result.already_finished = step, True
            result.log_history = list(trainer.state.log_history)
            return

    # 6. train: a fresh run first sets the earlier run's files aside
    if trainer.args.should_save:
        remove_stale_tmp(out)
        if resume is None:
            set_aside_previous_run(out, keep=(str(cfg.model_name_or_path), str(cfg.get("dataset_dir") or "")))
        os.makedirs(out, exist_ok=True)
        write_run_file(out, identity)
    started = time.time()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLossError as exc:
        raise exc.with_checkpoint(latest_checkpoint(out)) from None
    logger.info("training took %.1f s", time.time() - started)

    # 7. outputs
    _publish_final(trainer, out)
    metrics = dict(train_result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if splits.eval and cfg.do_eval:
        eval_metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if trainer.is_world_process_zero() and cfg.get("plot_loss", False):
        plot_loss(out, keys=("loss", "eval_loss"))
    if trainer.args.should_save:
        _record_outputs(out, identity)
    result.metrics, result.global_step = metrics, trainer.state.global_step
    result.log_history = list(trainer.state.log_history)
