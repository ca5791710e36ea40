"""``pissa_convert: true``: the trained PiSSA adapter also as a plain LoRA of the original weights.

LLaMA-Factory's layout (its ``PissaConvertCallback``): at the start of training the initial adapter
goes to ``output_dir/pissa_init`` (``init_lora_weights: true``); at the end the converted adapter
goes to ``output_dir/pissa_converted`` (rank 2r, loads onto the *original* base with PEFT or
npu-ft). ``output_dir`` itself keeps the PiSSA adapter (its base is the residual). Differences: a
resumed run keeps the ``pissa_init`` of the first start (LLaMA-Factory would overwrite it with the
resumed weights), no ``pissa_backup`` folder is needed, and ``modules_to_save`` tensors are kept in
the converted adapter.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import TrainerCallback

from .adapter_io import save_pissa_converted, save_pissa_init

__all__ = ["PISSA_CONVERTED_DIR", "PISSA_INIT_DIR", "PissaConvertCallback"]

logger = logging.getLogger(__name__)

PISSA_INIT_DIR = "pissa_init"
PISSA_CONVERTED_DIR = "pissa_converted"


class PissaConvertCallback(TrainerCallback):
    """Writes ``pissa_init`` at train begin and ``pissa_converted`` at train end (main process only).

    Args:
        cfg: the recipe (its ``model_name_or_path`` goes into the adapter configs).
    """

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg
        self.base = None if cfg is None else str(getattr(cfg, "model_name_or_path", None))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        init_dir = os.path.join(args.output_dir, PISSA_INIT_DIR)
        if not args.should_save or (state.global_step > 0 and os.path.isdir(init_dir)):
            return  # resumed: the initial adapter of the first start stays
        save_pissa_init(model, init_dir, self.cfg, base_model_name_or_path=self.base)
        logger.info("pissa_convert: initial PiSSA adapter saved in %s", init_dir)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not args.should_save:
            return
        out = os.path.join(args.output_dir, PISSA_CONVERTED_DIR)
        save_pissa_converted(model, out, os.path.join(args.output_dir, PISSA_INIT_DIR), self.cfg,
                             base_model_name_or_path=self.base)
        logger.info("pissa_convert: the adapter as a LoRA of the original weights (rank 2r) saved in %s", out)
