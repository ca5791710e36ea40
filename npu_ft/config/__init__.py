"""Configuration: typed recipe keys in groups, read from YAML with errors that name file and key.

* :mod:`.schema` -- the field/metadata mechanism and the parser every config file uses;
* :mod:`.model_args`, :mod:`.method_args`, :mod:`.data_args`, :mod:`.training_args`,
  :mod:`.npu_ft_args` -- the groups of keys; :mod:`.lf_compat` -- LLaMA-Factory keys npu-ft accepts
  without implementing; :mod:`.hf_fields` -- transformers' other ``TrainingArguments`` (generated);
* :mod:`.sft` -- :class:`SftConfig`, :func:`load_config`; :mod:`.hf_args` -- ``TrainingArguments``;
* :mod:`.yaml_io` -- safe YAML reading; :mod:`.docs` -- docs/config.md.

Reading a recipe imports neither torch nor transformers.
"""

from .schema import ConfigError, FieldInfo, UnsupportedError
from .sft import GROUPS, OPTIONS, SftConfig, build_config, load_config, option, parse_overrides


def to_training_arguments(cfg: SftConfig, **changes):
    """``transformers.TrainingArguments`` for ``cfg`` (see :mod:`npu_ft.config.hf_args`)."""
    from .hf_args import to_training_arguments as build

    return build(cfg, **changes)


__all__ = [
    "GROUPS",
    "OPTIONS",
    "ConfigError",
    "FieldInfo",
    "SftConfig",
    "UnsupportedError",
    "build_config",
    "load_config",
    "option",
    "parse_overrides",
    "to_training_arguments",
]
