"""``SftTrainer``: transformers' ``Trainer`` with the few changes npu-ft needs.

Everything else (the loop, accelerate, DeepSpeed, gradient accumulation, skipping seen batches on
resume, the tqdm progress bar) is transformers'. What is changed:

* **Adapter checkpoints.** LoRA/QLoRA models are transformers models with npu-ft's ``LoraLinear``
  modules injected (not ``peft.PeftModel``), so saving writes the PEFT-format adapter
  (``adapter_config.json`` + ``adapter_model.safetensors``) through ``adapter_io``, and resuming
  loads it back into the live modules. Full fine-tuning saves with ``save_pretrained``
  (safetensors).
* **Atomic checkpoints.** ``checkpoint-N`` is written completely into ``tmp-checkpoint-N`` and then
  renamed (:func:`npu_ft.train.checkpoint.atomic_publish`), so a kill while saving never leaves a
  half-written ``checkpoint-N`` for ``resume_from_checkpoint: true`` to pick; a save that fails
  (e.g. a full disk) removes its staging folder and the previous checkpoints stay as they were.
  Each checkpoint gets ``npu_ft_run.json`` (:mod:`npu_ft.train.run_identity`): the run that made
  it and the files written.
* **No pickle.** ``training_args.json`` instead of ``training_args.bin``; optimizer, scheduler,
  grad-scaler and RNG state as ``*.safetensors`` (:mod:`npu_ft.train.state_io`) instead of
  ``torch.save`` files. Under DeepSpeed, FSDP, XLA or SageMaker (their own checkpoint formats), or
  for an optimizer whose state holds other objects, transformers' files are written (with a
  warning); transformers loads those with ``torch.load(weights_only=True)`` (tensors and plain
  containers only).
* **Loss.** Unchanged: the model's own. ``run_sft`` patches the model's forward with the chunked
  fused linear cross-entropy (:mod:`npu_ft.modules.fused_loss`, ``fused_cross_entropy``), which runs
  the output head only on labelled positions; with it off, transformers' loss runs as it is.
* **NaN/inf guard.** Every micro-batch loss is checked after backward and before the optimizer
  step; a non-finite loss raises :class:`~npu_ft.train.callbacks.NonFiniteLossError` naming the
  step, so the bad update never reaches the weights and no checkpoint of it is written.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .callbacks import NonFiniteLossGuard
from .checkpoint import CheckpointError, atomic_publish, check_resumable, tmp_checkpoint_dir
from .outputs import fix_modes
from .run_identity import RunIdentity, snapshot_files, write_run_file
from .state_io import UnsupportedStateError, encode, load_state, save_state

logger = logging.getLogger(__name__)

__all__ = ["OPTIMIZER_FILE", "RNG_FILE", "SCALER_FILE", "SCHEDULER_FILE", "SftTrainer", "TRAINING_ARGS_FILE"]

AdapterSaver = Callable[[torch.nn.Module, str], Any]
AdapterLoader = Callable[[torch.nn.Module, str], Any]

TRAINING_ARGS_FILE = "training_args.json"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.safetensors"
SCALER_FILE = "scaler.safetensors"
RNG_FILE = "rng_state.safetensors"


class SftTrainer(Trainer):
    """``transformers.Trainer`` + adapter save/load, atomic checkpoints, no pickles and the NaN guard.

    Args (besides ``Trainer``'s):
        save_adapter: ``fn(model, folder)`` writing the PEFT-format adapter (LoRA/QLoRA); None for
            full fine-tuning (``save_pretrained``).
        load_adapter: ``fn(model, folder)`` loading adapter weights into the live model (resume).
        nan_guard: the :class:`NonFiniteLossGuard` (one is made when not given).
        run_identity: written into every checkpoint as ``npu_ft_run.json``.
        method: ``lora`` / ``qlora`` / ``full``; a checkpoint of another method is refused on load.
        model_card: ``fn(folder, state)`` writing ``README.md`` into every checkpoint.
    """

    def __init__(
        self,
        *args: Any,
        save_adapter: AdapterSaver | None = None,
        load_adapter: AdapterLoader | None = None,
        nan_guard: NonFiniteLossGuard | None = None,
        run_identity: RunIdentity | None = None,
        method: str | None = None,
        model_card: Callable[[str, Any], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self._adapter_saver = save_adapter
        self._adapter_loader = load_adapter
        self.nan_guard = nan_guard or NonFiniteLossGuard()
        self.run_identity = run_identity
        self.method = method or ("full" if save_adapter is None else "lora")
        self.model_card = model_card
        self._staging_root: str | None = None
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(cb is self.nan_guard for cb in callbacks):
            callbacks.append(self.nan_guard)
        super().__init__(*args, callbacks=callbacks, **kwargs)

    # -- NaN / inf guard ---------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = float(loss.detach().float().item())
        self.nan_guard.check(value, self.state.global_step + 1)
        return loss

    # -- checkpoints -------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` under a temp folder, then rename it into place."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = tmp_checkpoint_dir(run_dir, self.state.global_step)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                folder = os.path.join(staging, name)
                if self.model_card is not None:
                    self.model_card(folder, self.state)
                fix_modes(folder)  # safetensors writes 0600 files
                if self.run_identity is not None:
                    write_run_file(folder, self.run_identity, snapshot_files(folder))
        except BaseException:
            if self.args.should_save:  # the previous checkpoints stay as they were
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            atomic_publish(os.path.join(staging, name), os.path.join(run_dir, name))
            shutil.rmtree(staging, ignore_errors=True)
            # the staged trainer_state.json points at the staging folder; fix the best-model path
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, name)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Weights (adapter or ``save_pretrained``), tokenizer and ``training_args.json``; no pickle."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
            return
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self._adapter_saver is None:
            # transformers 5 writes safetensors only; non-writer ranks join the gathers of a sharded model
            model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        elif self.args.should_save:
            self._adapter_saver(model, output_dir)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, TRAINING_ARGS_FILE), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())

    # -- optimizer / scheduler / scaler / RNG state as safetensors ---------------------------
    def _own_state_files(self) -> bool:
        """Whether npu-ft writes the training state (not DeepSpeed / FSDP / XLA / SageMaker / HPU ...)."""
        from transformers.utils import (
            is_sagemaker_mp_enabled,
            is_torch_hpu_available,
            is_torch_mlu_available,
            is_torch_musa_available,
            is_torch_xla_available,
        )

        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled or is_torch_xla_available()
                    or is_sagemaker_mp_enabled() or is_torch_hpu_available() or is_torch_mlu_available()
                    or is_torch_musa_available())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._own_state_files():
            super()._save_optimizer_and_scheduler(output_dir)
            return
        if not self.args.should_save:
            return
        states = {OPTIMIZER_FILE: self.optimizer.state_dict(), SCHEDULER_FILE: self.lr_scheduler.state_dict()}
        try:
            for state in states.values():
                encode(state, {})  # every value storable? (raises before anything is written)
        except UnsupportedStateError as exc:
            logger.warning("optimizer/scheduler state: %s; writing transformers' torch.save files instead", exc)
            super()._save_optimizer_and_scheduler(output_dir)
            return
        for name, state in states.items():
            save_state(state, os.path.join(output_dir, name))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, OPTIMIZER_FILE)):
            super()._load_optimizer_and_scheduler(checkpoint)  # *.pt files: torch.load(weights_only=True)
            return
        self.optimizer.load_state_dict(load_state(os.path.join(checkpoint, OPTIMIZER_FILE)))
        self.lr_scheduler.load_state_dict(load_state(os.path.join(checkpoint, SCHEDULER_FILE)))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not self._own_state_files():
            super()._save_scaler(output_dir)
            return
        if self.args.should_save:
            save_state(scaler.state_dict(), os.path.join(output_dir, SCALER_FILE))

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, SCALER_FILE)):
            super()._load_scaler(checkpoint)
            return
        self.accelerator.scaler.load_state_dict(load_state(os.path.join(checkpoint, SCALER_FILE)))

    def _rng_file(self, folder: str) -> str:
        name = RNG_FILE if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.safetensors"
        return os.path.join(folder, name)

    def _rng_devices(self) -> list[tuple[str, Any]]:
        from npu_ft.device import device_rng_runtimes

        return device_rng_runtimes()

    def _save_rng_state(self, output_dir: str) -> None:
        if not self._own_state_files():
            super()._save_rng_state(output_dir)
            return
        from transformers.training_args import ParallelMode

        distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
        states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                                  "cpu": torch.random.get_rng_state()}
        for name, module in self._rng_devices():
            states[name] = module.random.get_rng_state_all() if distributed else module.random.get_rng_state()
        os.makedirs(output_dir, exist_ok=True)
        save_state(states, self._rng_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not os.path.isfile(self._rng_file(checkpoint)):
            super()._load_rng_state(checkpoint)
            return
        from transformers.trainer_pt_utils import set_rng_state_for_device
        from transformers.training_args import ParallelMode

        states = load_state(self._rng_file(checkpoint))
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
        for name, module in self._rng_devices():
            if name in states:
                set_rng_state_for_device(name.upper(), module, states, distributed)

    # -- resuming ----------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        check_resumable(resume_from_checkpoint, self.method)
        if self._adapter_loader is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            return
        target = model if model is not None else self.model
        target = self.accelerator.unwrap_model(target, keep_torch_compile=False)
        try:
            self._adapter_loader(target, resume_from_checkpoint)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{resume_from_checkpoint}: cannot load the adapter: {exc}") from exc
