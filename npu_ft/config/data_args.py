"""Data keys of a recipe: LLaMA-Factory 0.9.5's ``DataArguments`` (names, defaults, rules).

The same class is the data pipeline's argument object (:mod:`npu_ft.data`), so a key is declared
once. Built directly (``DataArguments(dataset="a,b", ...)``) it normalises and checks itself as
LLaMA-Factory does; inside a recipe, :class:`~npu_ft.config.sft.SftConfig` runs the same rules with
errors that name the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .schema import ConfigError, config_field, not_yet

__all__ = ["DataArguments"]

#: fail(key, message): raise an error about ``key``
Fail = Callable[[str, str], None]


def _split_names(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return [str(name).strip() for name in value]


def _plain_fail(key: str, message: str) -> None:
    raise ConfigError(message, key=key)


@dataclass
class DataArguments:
    """Data settings. ``dataset`` may be a comma separated string ("a,b") or a list; ``neat_packing``
    turns ``packing`` on; ``packing=None`` means "off" for SFT (LLaMA-Factory only defaults it on for
    pre-training). ``cutoff_len`` is kept as given; the length sequences are built to
    (``cutoff_len - 1`` when packing) is :attr:`effective_cutoff_len`."""

    GROUP = "data"

    dataset: list[str] | None = config_field(None, "Dataset name(s) from dataset_info.json, comma list.")
    eval_dataset: list[str] | None = config_field(None, "Evaluation dataset name(s), comma list.")
    dataset_dir: str = config_field("data", "Folder holding dataset_info.json and the data files.")
    template: str | None = config_field(None, "Chat template (qwen, qwen3, ...).")
    cutoff_len: int = config_field(2048, "Maximum tokens per example (budget split source/target).", minimum=1)
    train_on_prompt: bool = config_field(False, "Also learn the prompt tokens.")
    mask_history: bool = config_field(False, "Learn only the last turn (not with train_on_prompt).")
    packing: bool | None = config_field(None, "Pack examples into cutoff_len sequences (None = off for sft).")
    neat_packing: bool = config_field(False, "Packing without cross-example attention (turns packing on).")
    default_system: str | None = config_field(None, "System prompt used when an example has none.")
    enable_thinking: bool | None = config_field(True, "Thinking mode for reasoning templates (qwen3).",
                                                nullable=False)
    preserve_thinking: bool = config_field(
        False, "Keep the thoughts of earlier turns with mask_history (reasoning templates).")
    tool_format: str | None = config_field(None, "Tool-call format for function calling examples.")
    val_size: float = config_field(0.0, "Validation split: fraction in [0,1) or a count >= 1.", minimum=0.0)
    max_samples: int | None = config_field(None, "Use at most this many examples per dataset.", minimum=1)
    preprocessing_num_workers: int | None = config_field(None, "Processes for tokenisation.", minimum=1)
    preprocessing_batch_size: int = config_field(1000, "Examples per tokenisation batch.", minimum=1)
    overwrite_cache: bool = config_field(False, "Re-tokenise even if a cache exists.")
    mix_strategy: Literal["concat"] = config_field(
        "concat", "How several datasets are mixed.",
        unsupported_values=not_yet("mix_strategy", "interleave_under", "interleave_over"))

    def __post_init__(self) -> None:
        self.dataset = _split_names(self.dataset)
        self.eval_dataset = _split_names(self.eval_dataset)
        if self.cutoff_len is None or int(self.cutoff_len) < 2:
            raise ConfigError(f"cutoff_len must be an integer >= 2, got {self.cutoff_len!r}", key="cutoff_len")
        self.cutoff_len = int(self.cutoff_len)
        if self.val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {self.val_size}", key="val_size")
        if self.max_samples is not None and int(self.max_samples) < 0:
            raise ConfigError(f"max_samples must be >= 0, got {self.max_samples}", key="max_samples")
        if self.mix_strategy != "concat":
            from .schema import UnsupportedError

            raise UnsupportedError(f"mix_strategy={self.mix_strategy!r} is not supported yet; only 'concat' "
                                   "(the default) is.", key="mix_strategy")
        if self.preprocessing_batch_size < 1:
            raise ConfigError("preprocessing_batch_size must be >= 1", key="preprocessing_batch_size")
        self.apply_data_rules(_plain_fail)

    def apply_data_rules(self, fail: Fail) -> None:
        """LLaMA-Factory's cross-key data rules (also run for a whole recipe, with file names)."""
        if self.mask_history and self.train_on_prompt:
            fail("mask_history", "mask_history cannot be combined with train_on_prompt")
        if self.val_size >= 1 and not float(self.val_size).is_integer():
            fail("val_size", "must be a fraction in [0, 1) or a whole number of examples")
        if self.val_size > 1e-6 and self.dataset is None:
            fail("val_size", "val_size needs a dataset")
        if self.val_size > 1e-6 and self.eval_dataset is not None:
            fail("val_size", "cannot set both val_size and eval_dataset")
        if self.neat_packing:
            self.packing = True

    @property
    def use_packing(self) -> bool:
        return bool(self.packing)

    @property
    def effective_cutoff_len(self) -> int:
        """The sequence budget the processor works with: ``cutoff_len - 1`` when packing (as LF)."""
        return self.cutoff_len - 1 if self.use_packing else self.cutoff_len

    def data_arguments(self) -> DataArguments:
        """A plain :class:`DataArguments` with this object's data keys (e.g. from a whole recipe)."""
        from .schema import field_infos

        return DataArguments(**{name: getattr(self, name) for name in field_infos(DataArguments)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
