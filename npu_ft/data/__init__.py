"""SFT data: LLaMA-Factory 0.9.5 compatible datasets, templates and processing.

Pipeline: ``dataset_info.json`` (:mod:`.dataset_info`) -> records (:mod:`.readers`) -> turns
(:mod:`.converters`) -> template token ids (:mod:`.templates`) -> ``input_ids``/``labels``
(:mod:`.supervised`) -> packs (:mod:`.packing`) -> batches (:mod:`.collator`).
Entry point: :func:`build_sft_dataset` with a :class:`DataArguments`.
"""

from .args import DataArguments
from .collator import SFTDataCollator, block_diagonal_causal_mask
from .constants import IGNORE_INDEX
from .converters import ConvertedExample, DataFormatError
from .dataset import SFTSplits, build_sft_dataset, build_sft_splits
from .dataset_info import DatasetAttr, DatasetInfoError, get_dataset_attrs
from .readers import DataFileError
from .templates import TEMPLATES, Template, get_template

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "ConvertedExample",
    "DataArguments",
    "DataFileError",
    "DataFormatError",
    "DatasetAttr",
    "DatasetInfoError",
    "SFTDataCollator",
    "SFTSplits",
    "Template",
    "block_diagonal_causal_mask",
    "build_sft_dataset",
    "build_sft_splits",
    "get_dataset_attrs",
    "get_template",
]
