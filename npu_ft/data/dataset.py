"""Top-level SFT data pipeline: dataset_info.json -> records -> turns -> token ids (-> packs).

The trainer calls :func:`build_sft_dataset` (train split) or :func:`build_sft_splits` (train and
optional eval split, from ``val_size`` or ``eval_dataset``) and batches with
:class:`~npu_ft.data.collator.SFTDataCollator`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from math import ceil
from typing import Any

import numpy as np

from .args import DataArguments
from .converters import ConvertedExample, convert_records
from .dataset_info import get_dataset_attrs
from .packing import pack_examples
from .readers import list_data_files, read_records, select_samples
from .supervised import process_supervised
from .templates import Template, fix_tokenizer_for_template, get_template

__all__ = ["SFTSplits", "build_prompt_split", "build_sft_dataset", "build_sft_splits", "encode_examples",
           "load_converted"]

logger = logging.getLogger("npu_ft.data")


@dataclass
class SFTSplits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None = None


def load_converted(names: list[str], args: DataArguments, seed: int = 42) -> list[ConvertedExample]:
    """Read and convert the named datasets and concatenate them (``mix_strategy: concat``)."""
    out: list[ConvertedExample] = []
    for attr in get_dataset_attrs(names, args.dataset_dir):
        files = list_data_files(args.dataset_dir, attr.file_name)
        records = read_records(files)
        rows = select_samples(list(range(len(records))), attr.num_samples, args.max_samples, seed)
        records = [records[row] for row in rows]
        source = files[0] if len(files) == 1 else os.path.join(args.dataset_dir, attr.file_name)
        out.extend(convert_records(records, attr, source, rows))
        logger.info("Loaded dataset %s: %d examples from %s", attr.name, len(records), source)
    return out


def _train_test_split(items: list, val_size: float, seed: int) -> tuple[list, list]:
    """Same split as ``datasets.Dataset.train_test_split(test_size, seed)`` used by LF."""
    n = len(items)
    n_test = int(val_size) if val_size > 1 else ceil(val_size * n)
    if n_test >= n or n_test <= 0:
        raise ValueError(f"val_size={val_size} leaves no train or no eval example out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return [items[i] for i in perm[n_test:]], [items[i] for i in perm[:n_test]]


def encode_examples(
    examples: list[ConvertedExample], args: DataArguments, template: Template, tokenizer
) -> list[dict[str, Any]]:
    """Tokenize (and pack) converted examples in processing batches of ``preprocessing_batch_size``
    (packing only combines examples within one batch, as in LF)."""
    cutoff = args.effective_cutoff_len
    out: list[dict[str, Any]] = []
    step = args.preprocessing_batch_size
    for start in range(0, len(examples), step):
        chunk = process_supervised(
            examples[start : start + step], template, tokenizer, cutoff, args.train_on_prompt, args.mask_history
        )
        if args.use_packing:
            chunk = pack_examples(chunk, cutoff, tokenizer.pad_token_id, args.neat_packing)
        out.extend(chunk)
    if not out:
        raise RuntimeError(
            "Cannot find valid samples: every example was dropped (see the warnings above); check the dataset "
            "format against dataset_info.json."
        )
    return out


def build_sft_splits(args: DataArguments, tokenizer, seed: int = 42) -> SFTSplits:
    """Train (and eval) items: dicts with ``input_ids``, ``attention_mask``, ``labels`` and, when
    packing, ``position_ids``. ``seed`` is the training seed (used by ``val_size`` and ``num_samples``)."""
    if not args.dataset:
        raise ValueError("`dataset` is required for SFT.")
    template = get_template(args.template, args.default_system, args.enable_thinking, args.preserve_thinking)
    fix_tokenizer_for_template(template, tokenizer)
    examples = load_converted(args.dataset, args, seed)
    eval_examples = None
    if args.val_size > 1e-6:
        examples, eval_examples = _train_test_split(examples, args.val_size, seed)
    elif args.eval_dataset:
        eval_examples = load_converted(args.eval_dataset, args, seed)
    train = encode_examples(examples, args, template, tokenizer)
    evals = encode_examples(eval_examples, args, template, tokenizer) if eval_examples is not None else None
    return SFTSplits(train=train, eval=evals)


def build_prompt_split(args: DataArguments, tokenizer, seed: int = 42) -> list[dict[str, Any]]:
    """The evaluation examples as prompts for generation (``do_predict`` + ``predict_with_generate``):
    ``input_ids`` the prompt, ``labels`` the expected answer (LLaMA-Factory's unsupervised processor).
    The examples are those of :func:`build_sft_splits`'s eval split (``val_size`` or ``eval_dataset``)."""
    from .unsupervised import process_unsupervised

    template = get_template(args.template, args.default_system, args.enable_thinking, args.preserve_thinking)
    fix_tokenizer_for_template(template, tokenizer)
    if args.val_size > 1e-6:
        _, examples = _train_test_split(load_converted(args.dataset or [], args, seed), args.val_size, seed)
    elif args.eval_dataset:
        examples = load_converted(args.eval_dataset, args, seed)
    else:
        raise ValueError("prediction needs eval_dataset or val_size > 0")
    return process_unsupervised(examples, template, tokenizer, args.cutoff_len)


def build_sft_dataset(args: DataArguments, tokenizer, seed: int = 42) -> list[dict[str, Any]]:
    """The training items (see :func:`build_sft_splits`)."""
    return build_sft_splits(args, tokenizer, seed).train
