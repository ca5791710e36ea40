"""SFT data: LLaMA-Factory 0.9.5 compatible datasets, templates and processing.

Pipeline: ``dataset_info.json`` (:mod:`.dataset_info`) -> records (:mod:`.readers`) -> turns
(:mod:`.converters`) -> template token ids (:mod:`.templates`) -> ``input_ids``/``labels``
(:mod:`.supervised`) -> packs (:mod:`.packing`) -> batches (:mod:`.collator`).
Entry point: :func:`build_sft_dataset` with a :class:`DataArguments`.

The names below are loaded on first use, so that ``npu_ft.data.templates`` (which the config
reads to check ``template:``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_EXPORTS = {
    "IGNORE_INDEX": "constants",
    "TEMPLATES": "templates",
    "ConvertedExample": "converters",
    "DataArguments": "args",
    "DataFileError": "readers",
    "DataFormatError": "converters",
    "DatasetAttr": "dataset_info",
    "DatasetInfoError": "dataset_info",
    "SFTDataCollator": "collator",
    "SFTSplits": "dataset",
    "Template": "templates",
    "block_diagonal_causal_mask": "collator",
    "build_sft_dataset": "dataset",
    "build_sft_splits": "dataset",
    "get_dataset_attrs": "dataset_info",
    "get_template": "templates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
