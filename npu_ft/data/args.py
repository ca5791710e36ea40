"""``DataArguments``: the data keys of a LLaMA-Factory recipe, with its defaults and checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def _split_names(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [name.strip() for name in value.split(",")]
    return list(value)


@dataclass
class DataArguments:
    """Data settings, named and defaulted as LLaMA-Factory 0.9.5's ``DataArguments``.

    ``dataset`` may be a comma separated string ("a,b") or a list. ``neat_packing`` turns
    ``packing`` on. ``packing=None`` means "off" for SFT (LLaMA-Factory only defaults it on for
    pre-training). Unlike LLaMA-Factory, ``cutoff_len`` is kept as given; the length the sequences
    are actually built to (``cutoff_len - 1`` when packing) is :attr:`effective_cutoff_len`.
    """

    dataset: str | list[str] | None = None
    dataset_dir: str = "data"
    template: str | None = None
    cutoff_len: int = 2048
    train_on_prompt: bool = False
    mask_history: bool = False
    packing: bool | None = None
    neat_packing: bool = False
    default_system: str | None = None
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    val_size: float = 0.0
    max_samples: int | None = None
    mix_strategy: str = "concat"
    preprocessing_batch_size: int = 1000
    eval_dataset: str | list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        self.dataset = _split_names(self.dataset)
        self.eval_dataset = _split_names(self.eval_dataset)
        if self.cutoff_len is None or int(self.cutoff_len) < 2:
            raise ValueError(f"cutoff_len must be an integer >= 2, got {self.cutoff_len!r}")
        self.cutoff_len = int(self.cutoff_len)
        if self.mask_history and self.train_on_prompt:
            raise ValueError("`mask_history` is incompatible with `train_on_prompt`.")
        if self.dataset is None and self.val_size > 1e-6:
            raise ValueError("Cannot specify `val_size` if `dataset` is None.")
        if self.eval_dataset is not None and self.val_size > 1e-6:
            raise ValueError("Cannot specify `val_size` if `eval_dataset` is not None.")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if self.max_samples is not None and int(self.max_samples) < 0:
            raise ValueError(f"max_samples must be >= 0, got {self.max_samples}")
        if self.mix_strategy != "concat":
            raise NotImplementedError(
                f"mix_strategy={self.mix_strategy!r} is not supported yet; only 'concat' (the default) is."
            )
        if self.preprocessing_batch_size < 1:
            raise ValueError("preprocessing_batch_size must be >= 1")
        if self.neat_packing:
            self.packing = True

    @property
    def use_packing(self) -> bool:
        return bool(self.packing)

    @property
    def effective_cutoff_len(self) -> int:
        """The sequence budget the processor works with: ``cutoff_len - 1`` when packing (as LF)."""
        return self.cutoff_len - 1 if self.use_packing else self.cutoff_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
