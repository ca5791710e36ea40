"""``SftTrainer``: transformers' ``Trainer`` with the few changes npu-ft needs.

Everything else (the loop, accelerate, DeepSpeed, gradient accumulation, optimizer/scheduler/RNG
state in checkpoints, skipping seen batches on resume, the tqdm progress bar) is transformers'.
What is changed:

* **Adapter checkpoints.** LoRA/QLoRA models are transformers models with npu-ft's ``LoraLinear``
  modules injected (not ``peft.PeftModel``), so saving writes the PEFT-format adapter
  (``adapter_config.json`` + ``adapter_model.safetensors``) through ``adapter_io``, and resuming
  loads it back into the live modules. Full fine-tuning keeps transformers' own save/load.
* **Atomic checkpoints.** ``checkpoint-N`` is written completely into ``tmp-checkpoint-N`` and then
  renamed (:func:`npu_ft.train.checkpoint.atomic_publish`), so a kill while saving never leaves a
  half-written ``checkpoint-N`` for ``resume_from_checkpoint: true`` to pick.
* **Loss.** Unchanged: the model's own. ``run_sft`` patches the model's forward with the chunked
  fused linear cross-entropy (:mod:`npu_ft.modules.fused_loss`, ``fused_cross_entropy``), which runs
  the output head only on labelled positions; with it off, transformers' loss runs as it is.
* **NaN/inf guard.** Every micro-batch loss is checked after backward and before the optimizer
  step; a non-finite loss raises :class:`~npu_ft.train.callbacks.NonFiniteLossError` naming the
  step, so the bad update never reaches the weights and no checkpoint of it is written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .callbacks import NonFiniteLossGuard
from .checkpoint import atomic_publish, tmp_checkpoint_dir

__all__ = ["SftTrainer"]

AdapterSaver = Callable[[torch.nn.Module, str], Any]
AdapterLoader = Callable[[torch.nn.Module, str], Any]


class SftTrainer(Trainer):
    """``transformers.Trainer`` + adapter save/load, atomic checkpoints and the NaN guard.

    Args (besides ``Trainer``'s):
        save_adapter: ``fn(model, folder)`` writing the PEFT-format adapter (LoRA/QLoRA); None for
            full fine-tuning (transformers' ``save_pretrained``).
        load_adapter: ``fn(model, folder)`` loading adapter weights into the live model (resume).
        nan_guard: the :class:`NonFiniteLossGuard` (one is made when not given).
    """

    def __init__(
        self,
        *args: Any,
        save_adapter: AdapterSaver | None = None,
        load_adapter: AdapterLoader | None = None,
        nan_guard: NonFiniteLossGuard | None = None,
        **kwargs: Any,
    ) -> None:
        self._adapter_saver = save_adapter
        self._adapter_loader = load_adapter
        self.nan_guard = nan_guard or NonFiniteLossGuard()
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

    # -- saving ------------------------------------------------------------------------------
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
        if self._adapter_saver is None:
            super()._save(output_dir, state_dict=state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self._adapter_saver(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    # -- resuming ----------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self._adapter_loader is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            return
        target = model if model is not None else self.model
        target = self.accelerator.unwrap_model(target, keep_torch_compile=False)
        self._adapter_loader(target, resume_from_checkpoint)
