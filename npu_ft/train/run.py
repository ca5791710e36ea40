"""``run_sft(cfg)``: one supervised fine-tuning run, in LLaMA-Factory's order.

checks (run keys, trackers, output_dir) -> device -> resume point -> tokenizer -> dataset -> run
identity -> memory estimate -> model + method + features (:mod:`.model_setup`) -> the plan in the
log (:mod:`.run_report`) -> :class:`~npu_ft.train.trainer.SftTrainer` (transformers' Trainer) ->
outputs -> evaluation and prediction.

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

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from npu_ft.logs import add_run_log, remove_run_log

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

__all__ = ["SftResult", "TrainingError", "run_sft"]

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
        logger.info("output_dir has checkpoints and overwrite_output_dir is false: resuming from %s if it belongs to "
                    "this run", last)
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
def _select_device(cfg: Any) -> tuple[Any, torch.device, torch.dtype]:
    """The device layer's backend and device for the recipe, the process set up for it, the compute dtype."""
    from npu_ft.device import select_device
    from npu_ft.model.loading import compute_dtype

    backend, device = select_device(None if cfg.device == "auto" else cfg.device)
    backend.set_device(device)
    for note in backend.prepare_process(malloc_tuning=bool(cfg.cpu_malloc_tuning)):
        logger.info(note)
    dtype = compute_dtype(cfg)
    if dtype == torch.bfloat16 and not backend.supports_bf16():
        raise TrainingError(f"{cfg.source}: key 'bf16': {backend.name} ({backend.device_name()}) has no bf16")
    return backend, device, dtype


def _find_resume(cfg: Any) -> tuple[str | None, bool | str | None, str]:
    """``(checkpoint to resume from, what the recipe asked, the key an error names)``; nothing written."""
    asked = parse_resume(cfg.resume_from_checkpoint)
    # not asked: a checkpoint may still be picked from output_dir (LLaMA-Factory's rule); errors name output_dir
    resume_key = "output_dir" if asked is None else "resume_from_checkpoint"
    try:
        resume = _check_output_dir(cfg, resolve_resume(asked, cfg.output_dir))
        if resume is not None:
            check_resumable(resume, cfg.method)
    except CheckpointError as exc:
        raise TrainingError(f"{cfg.source}: key '{resume_key}': {exc}") from None
    return resume, asked, resume_key


def _build_splits(cfg: Any, tokenizer):
    """Train (and eval) items; every data error surfaces here, before any output exists."""
    from npu_ft.data import DataFileError, DataFormatError, DatasetInfoError, build_sft_splits

    data_args = cfg.data_arguments()
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
    return splits


def _check_prediction(cfg: Any) -> None:
    """``do_predict`` needs examples to predict, and ``predict_with_generate`` the metrics extra."""
    if not cfg.do_predict:
        return
    if cfg.eval_dataset is None and cfg.val_size <= 1e-6:
        raise TrainingError(f"{cfg.where('do_predict')}: key 'do_predict': needs eval_dataset or val_size > 0")
    if cfg.predict_with_generate:
        import importlib.util

        missing = [m for m in ("jieba", "nltk", "rouge_chinese") if importlib.util.find_spec(m) is None]
        if missing:
            raise TrainingError(f"{cfg.where('predict_with_generate')}: key 'predict_with_generate': BLEU/ROUGE need "
                                f"{', '.join(missing)}: pip install \"npu-ft[metrics]\"")


def _collator(cfg: Any, tokenizer: Any, dtype: Any, model: Any):
    """LLaMA-Factory's SFT collator; where the model was loaded with transformers' fused attention on
    an NPU (``model_setup.prepare_model``'s attention plan), packed batches (``neat_packing``) are
    flattened for its varlen path instead of a dense 4D mask."""
    from npu_ft.data import SFTDataCollator
    from npu_ft.modules.npu_attention import VarlenPackedCollator

    plan = getattr(model, "npu_ft_attention_plan", None)
    varlen = bool(cfg.neat_packing) and plan is not None and plan.varlen_packing
    base = SFTDataCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8,
                           neat_packing=bool(cfg.neat_packing) and not varlen, compute_dtype=dtype)
    return VarlenPackedCollator(base) if varlen else base


def _features(cfg: Any, fused_loss: bool, model: Any = None) -> list[str]:
    """The npu-ft training features that are on, for the log."""
    on = [f"fused_cross_entropy {'on' if fused_loss else 'off'}"]
    on.append(f"gradient checkpointing {cfg.gradient_checkpointing_policy}" if cfg.gradient_checkpointing_enabled
              else "gradient checkpointing off")
    if cfg.shift_attn:
        on.append("shift_attn (S2-Attn)")
    if model is not None:
        from npu_ft.modules.fused_blocks import fused_kernels_applied

        patched = fused_kernels_applied(model)
        on.append("fused decoder-block kernels " + (", ".join(f"{k} x{n}" for k, n in sorted(patched.items()))
                                                    if patched else "off"))
    if cfg.loraplus_lr_ratio is not None:
        on.append(f"LoRA+ (lora_B learning rate x{cfg.loraplus_lr_ratio:g})")
    from npu_ft.optim import is_npu_ft_optim

    if is_npu_ft_optim(cfg.optim):
        on.append(f"optim {cfg.optim} (npu-ft)")
    return on


def run_sft(cfg: Any, callbacks: Sequence[Any] | None = None, trainer_kwargs: dict[str, Any] | None = None
            ) -> SftResult:
    """Fine-tune as the recipe says; returns an :class:`SftResult`.

    Raises :class:`TrainingError` (bad inputs), :class:`~npu_ft.device.DeviceUnavailableError`,
    :class:`~npu_ft.config.ConfigError`, the data errors of :mod:`npu_ft.data`, or
    :class:`~npu_ft.train.callbacks.NonFiniteLossError` (loss became NaN/inf; the last good
    checkpoint is kept and named in the message).
    """
    from npu_ft.config import to_training_arguments
    from npu_ft.config.trackers import check_trackers_installed
    from npu_ft.launch.budget import check_before_loading
    from npu_ft.optim import is_npu_ft_optim, trainer_optimizer

    from .model_setup import SetupError, enable_fused_loss, load_run_tokenizer, prepare_model
    from .preflight import check_run_keys
    from .run_report import log_run_plan
    from .trainer import SftTrainer

    # 0. what can be checked without any work
    check_run_keys(cfg)
    check_trackers_installed(cfg.report_to, cfg.where("report_to"))
    _check_prediction(cfg)
    try:
        check_output_dir(cfg.output_dir, cfg.model_name_or_path)
    except OutputDirError as exc:
        raise TrainingError(f"{cfg.source}: key 'output_dir': {exc}") from None

    # 1. device, 2. where to resume from, 3. tokenizer and data (no writes yet)
    backend, device, dtype = _select_device(cfg)
    resume, asked, resume_key = _find_resume(cfg)
    tokenizer = load_run_tokenizer(cfg)
    splits = _build_splits(cfg, tokenizer)

    # 3b. which run this is; a checkpoint of another run is refused
    identity = compute_identity(cfg)
    if resume is not None:
        try:
            check_same_run(resume, identity, automatic=not isinstance(asked, str))
        except CheckpointError as exc:
            raise TrainingError(f"{cfg.source}: key '{resume_key}': {exc}") from None

    # 4. model + method (seeded first, as LLaMA-Factory does, so LoRA init is reproducible)
    from transformers import set_seed

    check_before_loading(cfg, backend)  # warns when the estimate exceeds the device; resolves policy "auto"
    set_seed(int(cfg.seed))
    try:
        model = prepare_model(cfg, device, dtype)
    except SetupError as exc:
        raise TrainingError(str(exc)) from None
    trainer_kwargs = dict(trainer_kwargs or {})
    fused_loss = enable_fused_loss(cfg, model)
    _align_special_tokens(model, tokenizer)

    # 5. trainer
    changes: dict[str, Any] = {"output_dir": cfg.output_dir, **backend.training_arguments()}
    changes.setdefault("disable_tqdm", False)
    if cfg.disable_shuffling:
        changes["train_sampling_strategy"] = "sequential"
    args = to_training_arguments(cfg, **changes)
    optim_spec = trainer_optimizer(args.optim, args, model) if is_npu_ft_optim(args.optim) else None
    if cfg.loraplus_lr_ratio is not None:  # LoRA+: lora_B (and 1-D adapter tensors) at ratio x the learning rate
        from .loraplus import create_loraplus_optimizer

        if "optimizers" not in trainer_kwargs:  # an optimizer the caller passed wins, unbuilt here
            trainer_kwargs["optimizers"] = (create_loraplus_optimizer(
                model, args, float(cfg.loraplus_lr_ratio), float(cfg.loraplus_lr_embedding), optim_spec), None)
    elif optim_spec is not None:
        trainer_kwargs.setdefault("optimizer_cls_and_kwargs", optim_spec)
    if cfg.pissa_convert:
        from .pissa import PissaConvertCallback

        callbacks = [*(callbacks or []), PissaConvertCallback(cfg)]
    collator = _collator(cfg, tokenizer, dtype, model)
    save_adapter, load_adapter = _adapter_fns(cfg, cfg.method)
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
        nan_guard=NonFiniteLossGuard(),
        run_identity=identity,
        method=cfg.method,
        model_card=lambda folder, state: _write_model_card(cfg, folder, state.log_history, args.world_size),
        **trainer_kwargs,
    )
    total_steps = _planned_steps(trainer)

    def announce() -> None:
        log_run_plan(cfg, model, backend, device, dtype, args.world_size, total_steps, splits.train, tokenizer,
                     _features(cfg, fused_loss, model))

    result = SftResult(output_dir=cfg.output_dir, method=cfg.method, resumed_from=resume, device=str(device))
    try:
        _train_and_save(cfg, trainer, resume, identity, splits, result, total_steps, announce)
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


def _align_special_tokens(model: torch.nn.Module, tokenizer) -> None:
    """Give the model config and generation config the tokenizer's pad/bos/eos ids, as the Trainer would
    (it warns about it; for a Qwen tokenizer whose pad token is <|endoftext|> that is expected)."""
    from transformers.trainer_utils import align_special_tokens

    before = {k: getattr(model.config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    notices = logging.getLogger("transformers.trainer_utils")
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        align_special_tokens(model, tokenizer)
    finally:
        notices.setLevel(level)
    changed = {k: getattr(model.config, k, None) for k in before if getattr(model.config, k, None) != before[k]}
    if changed:
        logger.info("model config aligned with the tokenizer's special tokens: %s", changed)


def _write_model_card(cfg: Any, folder: str, log_history: Sequence[dict[str, Any]], world_size: int) -> None:
    from .outputs import chmod_like_open
    from .run_report import MODEL_CARD, model_card_text

    path = os.path.join(folder, MODEL_CARD)
    with open(path, "w", encoding="utf-8") as f:
        f.write(model_card_text(cfg, log_history, world_size))
    chmod_like_open(path)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _train_and_save(cfg: Any, trainer, resume: str | None, identity: RunIdentity, splits, result: SftResult,
                    total: int, announce: Callable[[], None]) -> None:
    """Steps 6 and 7 of :func:`run_sft`: train (or see the run is finished), then write the outputs;
    ``announce`` logs the run's plan (into ``running_log.txt`` too)."""
    out = cfg.output_dir
    if resume is not None:
        step = checkpoint_step(resume)
        if step > total:
            raise TrainingError(f"{cfg.source}: key 'resume_from_checkpoint': {resume} is at step {step}, past "
                                f"the end of this run ({total} steps)")
        if step == total:
            announce()
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
    run_log = add_run_log(out) if trainer.args.should_save else None
    try:
        announce()
        if resume is not None:
            logger.info("Resuming from %s (step %d of %d)", os.path.basename(resume), checkpoint_step(resume), total)
        _train_evaluate_predict(cfg, trainer, resume, identity, splits, result)
    finally:
        if run_log is not None:
            remove_run_log(run_log)


def _train_evaluate_predict(cfg: Any, trainer, resume: str | None, identity: RunIdentity, splits,
                            result: SftResult) -> None:
    out = cfg.output_dir
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
    if cfg.do_predict:
        metrics.update(_predict(cfg, trainer, splits))
    if trainer.is_world_process_zero() and cfg.plot_loss:
        plot_loss(out, keys=("loss", "eval_loss"))
    if trainer.args.should_save:
        _write_model_card(cfg, out, trainer.state.log_history, trainer.args.world_size)
        _record_outputs(out, identity)
    result.metrics, result.global_step = metrics, trainer.state.global_step
    result.log_history = list(trainer.state.log_history)


def _predict(cfg: Any, trainer, splits) -> dict[str, float]:
    """``do_predict``: with ``predict_with_generate`` generate answers for the eval prompts, write
    ``generated_predictions.jsonl`` and BLEU/ROUGE; else the prediction loss on the eval split. The
    metrics go to ``predict_results.json``."""
    if cfg.predict_with_generate:
        from npu_ft.data.dataset import build_prompt_split
        from npu_ft.data.templates import get_template

        from .predict import predict_and_score

        tokenizer = trainer.processing_class
        items = build_prompt_split(cfg.data_arguments(), tokenizer, seed=int(cfg.seed))
        stop_ids = [tokenizer.convert_tokens_to_ids(word) for word in get_template(cfg.template).stop_words]
        metrics = predict_and_score(trainer.model, tokenizer, items, cfg.output_dir, cfg.generation_kwargs(),
                                    batch_size=int(cfg.per_device_eval_batch_size), stop_token_ids=stop_ids,
                                    skip_special_tokens=bool(cfg.skip_special_tokens))
        logger.info("wrote %s (%d predictions)", os.path.join(cfg.output_dir, "generated_predictions.jsonl"),
                    len(items))
    else:
        metrics = trainer.predict(splits.eval, metric_key_prefix="predict").metrics
    trainer.log_metrics("predict", metrics)
    trainer.save_metrics("predict", metrics)
    return metrics
