"""Pack supervised examples into fixed-length sequences (LLaMA-Factory's packed processor).

Examples longer than the budget are dropped (with a warning); the rest are grouped by a greedy
knapsack (largest example that still fits, repeatedly) into sequences of ``cutoff_len`` tokens,
then padded to ``cutoff_len + 1``. Here ``cutoff_len`` is the already reduced budget (recipe
``cutoff_len - 1``), so every packed sequence is exactly the recipe's ``cutoff_len`` long.

Position ids restart at 0 for every example. With ``neat_packing`` the attention mask holds each
example's attention id (1, 2, ...; 0 on padding) so a block-diagonal mask can keep attention
inside each example; without it the mask is all ones (padding included, as in LF).
"""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict
from typing import Any

from .constants import IGNORE_INDEX

__all__ = ["greedy_knapsack", "pack_examples"]

logger = logging.getLogger("npu_ft.data")


def greedy_knapsack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group ``lengths`` into bins of at most ``capacity``: each bin repeatedly takes the largest
    remaining length that fits. Returns the lengths per bin (the input list is not modified)."""
    remaining = sorted(lengths)
    bins: list[list[int]] = []
    while remaining:
        space = capacity
        current: list[int] = []
        while True:
            pos = bisect.bisect(remaining, space)  # items [0, pos) are <= space
            if pos == 0:
                break
            length = remaining.pop(pos - 1)
            space -= length
            current.append(length)
        if not current:  # an item larger than the capacity: would loop forever
            raise ValueError(f"example of length {remaining[0]} does not fit capacity {capacity}")
        bins.append(current)
    return bins


def pack_examples(
    examples: list[dict[str, Any]], cutoff_len: int, pad_token_id: int, neat_packing: bool = False
) -> list[dict[str, list[int]]]:
    """Pack encoded examples (``input_ids``/``labels``) of one processing batch.

    ``cutoff_len`` is the reduced budget; each output has ``cutoff_len + 1`` tokens and keys
    ``input_ids``, ``attention_mask``, ``position_ids``, ``labels``.
    """
    kept: list[dict[str, Any]] = []
    by_length: dict[int, list[int]] = defaultdict(list)
    for ex in examples:
        length = len(ex["input_ids"])
        if length > cutoff_len:
            logger.warning("Dropped lengthy example with length %d > %d.", length, cutoff_len)
            continue
        by_length[length].append(len(kept))
        kept.append(ex)

    packed = []
    for lengths in greedy_knapsack([len(ex["input_ids"]) for ex in kept], cutoff_len):
        input_ids: list[int] = []
        labels: list[int] = []
        attention: list[int] = []
        positions: list[int] = []
        for seq_idx, length in enumerate(lengths):
            ex = kept[by_length[length].pop()]  # last of that length first, as LF
            input_ids += ex["input_ids"]
            labels += ex["labels"]
            positions += range(length)
            attention += [seq_idx + 1 if neat_packing else 1] * length
        pad = cutoff_len + 1 - len(input_ids)
        if pad > 0:
            input_ids += [pad_token_id] * pad
            labels += [IGNORE_INDEX] * pad
            positions += [0] * pad
            attention += [0 if neat_packing else 1] * pad
        packed.append(
            {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions, "labels": labels}
        )
    return packed
