"""Deprecated location of the training config: everything moved to :mod:`npu_ft.config`."""

from __future__ import annotations

from npu_ft.config import (
    GROUPS,
    OPTIONS,
    ConfigError,
    SftConfig,
    build_config,
    load_config,
    option,
    parse_overrides,
    to_training_arguments,
)
from npu_ft.config.docs import options_markdown
from npu_ft.config.schema import FieldInfo as Option


def to_data_arguments(cfg: SftConfig):
    """The recipe's data keys as the data pipeline's ``DataArguments``."""
    return cfg.data_arguments()


__all__ = [
    "GROUPS",
    "OPTIONS",
    "ConfigError",
    "Option",
    "SftConfig",
    "build_config",
    "load_config",
    "option",
    "options_markdown",
    "parse_overrides",
    "to_data_arguments",
    "to_training_arguments",
]
