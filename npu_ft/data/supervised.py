"""Turn converted examples into ``input_ids`` / ``labels`` (LLaMA-Factory's supervised processor).

Per turn the remaining budget (``cutoff_len`` minus what earlier turns used) is split between the
turn's source and target by :func:`infer_seqlen`; cuts keep the beginning of each. Source labels
are ``IGNORE_INDEX`` unless ``train_on_prompt``. With ``mask_history`` the turns are processed
last-first (so the last turn gets the budget first) and only the last turn's target is learned;
the turns still appear in chronological order in ``input_ids``.
"""

from __future__ import annotations

import logging
from typing import Any

from .constants import IGNORE_INDEX
from .converters import ConvertedExample
from .templates import Template

__all__ = ["infer_seqlen", "encode_supervised_example", "process_supervised"]

logger = logging.getLogger("npu_ft.data")


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How many source and target tokens of one turn fit in ``cutoff_len`` (LF's split rule).

    A target shorter than half the budget is kept whole; else a source shorter than half is kept
    whole and the target gets the rest; else the target gets its proportional share (rounded
    down) and the source what is left.
    """
    if 2 * target_len < cutoff_len:
        target_cap = cutoff_len
    elif 2 * source_len < cutoff_len:
        target_cap = cutoff_len - source_len
    else:
        target_cap = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(target_cap, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def encode_supervised_example(
    example: ConvertedExample,
    template: Template,
    tokenizer,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one valid example."""
    discard_history_thoughts = mask_history and not template.preserve_thinking
    turns = template.encode_multiturn(
        tokenizer, example.prompt + example.response, example.system, example.tools, discard_history_thoughts
    )
    eos_id = tokenizer.eos_token_id
    used = 1 if template.efficient_eos else 0
    if mask_history:
        turns = turns[::-1]  # the last turn gets the budget first

    pieces: list[tuple[list[int], list[int]]] = []
    for turn_idx, (source, target) in enumerate(turns):
        if used >= cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len - used)
        source, target = source[:source_len], target[:target_len]
        used += source_len + target_len

        if train_on_prompt:
            source_labels = list(source)
        elif template.efficient_eos and turn_idx != 0:
            source_labels = [eos_id] + [IGNORE_INDEX] * (source_len - 1)
        else:
            source_labels = [IGNORE_INDEX] * source_len
        if mask_history and turn_idx != 0:
            target_labels = [IGNORE_INDEX] * target_len
        else:
            target_labels = list(target)
        pieces.append((source + target, source_labels + target_labels))

    if mask_history:
        pieces.reverse()  # back to chronological order
    input_ids = [t for ids, _ in pieces for t in ids]
    labels = [t for _, lab in pieces for t in lab]
    if template.efficient_eos:
        input_ids.append(eos_id)
        labels.append(eos_id)
    return input_ids, labels


def _drop_message(example: ConvertedExample) -> str:
    return f"Dropped invalid example: {example.prompt + example.response}"


def process_supervised(
    examples: list[ConvertedExample],
    template: Template,
    tokenizer,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> list[dict[str, Any]]:
    """Encode each valid example to ``{"input_ids", "attention_mask", "labels"}``; invalid ones
    (even prompt length, no single response) are dropped with a warning, as in LF."""
    out = []
    for example in examples:
        if not example.is_valid:
            logger.warning(_drop_message(example))
            continue
        input_ids, labels = encode_supervised_example(
            example, template, tokenizer, cutoff_len, train_on_prompt, mask_history
        )
        out.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    return out
