"""A recipe's inputs checked before any process is launched or any file written, without a model.

:func:`check_inputs` runs for every ``npu-ft train`` (in the launching process, once): the run
keys (``do_train``, ``output_dir``, ``stage``), the model folder (weights, config and tokenizer
files), the data settings and template,
every dataset of ``dataset`` / ``eval_dataset`` found in ``dataset_info.json`` and each of its
files read and converted (a malformed JSON line, a missing column, roles out of order, an empty
dataset), and the ``report_to`` trackers installed. It imports neither transformers nor the model
stack, so a bad recipe fails in about the time ``import torch`` takes. :func:`check_tokenizer`
(the launcher, before it starts workers) also loads the tokenizer from the model folder.

Left to the trainer, which still reports them before writing anything: tokenization (a
``cutoff_len`` that leaves no target token, a ``val_size`` split) -- a full pass over a large
dataset is the slow part of data preparation -- and whether ``output_dir`` already holds a model.
The cost of reading the data files once more than the trainer does is documented in
docs/training.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from npu_ft.config.trackers import check_trackers_installed

__all__ = ["PreflightError", "check_inputs", "check_run_keys", "check_tokenizer"]

class PreflightError(ValueError):
    """A recipe input that cannot work; the message names the recipe file and the key."""


def check_inputs(cfg: Any) -> None:
    """Raise a one-line error (:class:`PreflightError`, or the data/model error naming the file
    and line) for the first input of ``cfg`` (an :class:`~npu_ft.config.SftConfig`) that
    cannot work. See the module docstring for what is and is not checked."""
    check_run_keys(cfg)
    _check_model_folder(cfg)
    _check_data(cfg)
    check_trackers_installed(cfg.report_to, cfg.where("report_to"))


def check_run_keys(cfg: Any) -> None:
    """``do_train`` is set, ``output_dir`` given, ``stage`` is sft."""
    if not cfg.do_train:
        raise PreflightError(f"{cfg.source}: key 'do_train': nothing to do (set do_train: true to train)")
    if not cfg.output_dir:
        raise PreflightError(f"{cfg.source}: key 'output_dir': is required")
    if cfg.get("stage", "sft") != "sft":
        raise PreflightError(f"{cfg.source}: key 'stage': only sft is supported, got {cfg.stage!r}")


def _check_model_folder(cfg: Any) -> None:
    from npu_ft.model.loading import TOKENIZER_FILES, ModelLoadError, has_tokenizer_files, resolve_model_path

    try:
        folder = resolve_model_path(cfg.model_name_or_path)
    except ModelLoadError as exc:
        raise PreflightError(f"{cfg.source}: {exc}") from None
    if not has_tokenizer_files(folder):
        raise PreflightError(f"{cfg.source}: model folder '{cfg.model_name_or_path}' has no tokenizer files (one of "
                             f"{', '.join(TOKENIZER_FILES)}); put the tokenizer next to the weights")


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Hold back the warnings of ``logger_name`` (the trainer's own pass over the data repeats them)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_data(cfg: Any) -> None:
    from npu_ft.data.dataset import load_converted
    from npu_ft.data.templates import get_template

    try:
        args = cfg.data_arguments()
    except (ValueError, NotImplementedError) as exc:
        raise PreflightError(f"{cfg.source}: {exc}") from None
    try:
        get_template(args.template, args.default_system, args.enable_thinking, args.preserve_thinking)
    except ValueError as exc:
        raise PreflightError(f"{cfg.source}: key 'template': {exc}") from None
    if not args.dataset:
        raise PreflightError(f"{cfg.source}: key 'dataset': is required for sft")
    for key in ("dataset", "eval_dataset"):
        names = getattr(args, key)
        if not names:
            continue
        with _quiet("npu_ft.data"):
            examples = load_converted(names, args, int(cfg.seed))
        if not examples:
            raise PreflightError(f"{cfg.source}: key '{key}': {','.join(names)} in {args.dataset_dir} "
                                 "has no example")


def check_tokenizer(cfg: Any) -> None:
    """The tokenizer loads from the model folder and has a vocabulary (imports transformers: seconds)."""
    from .model_setup import load_run_tokenizer

    tokenizer = load_run_tokenizer(cfg)
    if len(tokenizer) < 2:
        raise PreflightError(f"{cfg.source}: model folder '{cfg.model_name_or_path}': the tokenizer loads with "
                             f"{len(tokenizer)} token(s); check its tokenizer files")
