"""The training recipe: :class:`SftConfig` (every key typed, in groups) and how a YAML file becomes one.

A recipe is one YAML file with LLaMA-Factory 0.9.5's flat keys; ``key=value`` overrides from the
command line are merged over it (values read as YAML scalars, as ``llamafactory-cli train x.yaml
k=v`` does). Errors are :class:`~npu_ft.config.schema.ConfigError` and always name the file (or the
override) and the key.

>>> cfg = build_config({"model_name_or_path": "m", "lora_rank": 4})
>>> cfg.lora_alpha, cfg.lora_target, cfg.finetuning_type
(8, ['all'], 'lora')
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .data_args import DataArguments
from .generation_args import GeneratingArguments
from .hf_fields import OPTIMIZER_NAMES, REPORT_TO_NAMES, SCHEDULER_TYPES, TransformersTrainingArguments
from .lf_compat import LlamaFactoryCompat
from .method_args import MethodArguments
from .model_args import ModelArguments
from .npu_ft_args import NpuFtArguments
from .schema import (
    ConfigError,
    FieldInfo,
    UnsupportedError,
    coerce_field,
    field_infos,
    unknown_key_message,
    values_equal,
)
from .training_args import TrainingKeys

__all__ = ["GROUPS", "OPTIONS", "SftConfig", "build_config", "load_config", "option", "parse_overrides"]

#: the groups of keys, in the order the docs list them
GROUPS = ("model", "method", "data", "training", "npu_ft", "generation", "other")


@dataclass(repr=False)
class SftConfig(NpuFtArguments, GeneratingArguments, TransformersTrainingArguments, TrainingKeys, DataArguments,
                MethodArguments, ModelArguments, LlamaFactoryCompat):
    """A validated recipe: every known key is a typed attribute (defaults filled in).

    ``source`` is the file it came from; ``explicit`` the keys the recipe or overrides set;
    ``sources`` where each of those was set. Derived values follow LLaMA-Factory: ``lora_alpha``
    None -> 2 x rank; ``neat_packing`` turns ``packing`` on; ``packing`` None -> False for sft.
    ``cutoff_len`` is kept as written (LLaMA-Factory subtracts 1 when packing; see
    :attr:`effective_cutoff_len`).
    """

    source: str = field(default="<dict>", compare=False)
    explicit: frozenset[str] = field(default=frozenset(), compare=False)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name, info in OPTIONS.items():
            value = getattr(self, name)
            if value is None and info.default is None:
                continue
            coerced = coerce_field(info, value, self.where(name))
            if info.status == "unsupported" and not values_equal(coerced, info.default):
                raise UnsupportedError(f"{name} is not supported by npu-ft yet ({info.doc.rstrip('.')}); remove it "
                                       f"or set it to {info.default!r}", source=self.where(name), key=name)
            object.__setattr__(self, name, coerced)
        _check_recipe(self, self.fail)

    # -- errors that name where a key was set ------------------------------------------------
    def where(self, key: str) -> str:
        """The file or override that set ``key`` (the recipe file when it was not set)."""
        return self.sources.get(key, self.source)

    def fail(self, key: str, message: str) -> None:
        """Raise a :class:`ConfigError` about ``key``, naming where it was set."""
        raise ConfigError(message, source=self.where(key), key=key)

    # -- mapping-like access -----------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _ATTRIBUTES:
            raise AttributeError(f"unknown config key {name!r}")
        object.__setattr__(self, name, value)

    def __contains__(self, name: object) -> bool:
        return name in OPTIONS

    def __repr__(self) -> str:
        shown = {k: getattr(self, k) for k in sorted(self.explicit)}
        return f"SftConfig(source={self.source!r}, {shown})"

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in OPTIONS else default

    def to_dict(self) -> dict[str, Any]:
        """``{key: value}`` of every key."""
        return {name: getattr(self, name) for name in OPTIONS}

    def group(self, group: str) -> dict[str, Any]:
        """Values of one group (``model``, ``method``, ``data``, ``training``, ``npu_ft``, ...)."""
        return {name: getattr(self, name) for name, info in OPTIONS.items() if info.group == group}

    # -- derived -----------------------------------------------------------------------------
    @property
    def is_qlora(self) -> bool:
        return self.finetuning_type == "lora" and self.quantization_bit == 4

    @property
    def method(self) -> str:
        """``lora``, ``qlora``, ``vera`` or ``full``."""
        return "qlora" if self.is_qlora else self.finetuning_type

    @property
    def gradient_checkpointing_enabled(self) -> bool:
        return not self.disable_gradient_checkpointing


#: every known key -> its :class:`FieldInfo` (the single source of truth for docs and validation)
OPTIONS: dict[str, FieldInfo] = field_infos(SftConfig)
_ATTRIBUTES = frozenset(f.name for f in dataclasses.fields(SftConfig))


def option(name: str) -> FieldInfo:
    """The :class:`FieldInfo` of config key ``name``."""
    return OPTIONS[name]


# ---------------------------------------------------------------------------------------------
# cross-key rules (LLaMA-Factory's, plus npu-ft's "nothing to do" and name checks)
# ---------------------------------------------------------------------------------------------
def _check_recipe(cfg: SftConfig, fail: Callable[[str, str], None]) -> None:
    if not cfg.model_name_or_path:
        fail("model_name_or_path", "is required (a local model folder)")
    if cfg.lora_alpha is None:
        object.__setattr__(cfg, "lora_alpha", cfg.lora_rank * 2)
    _check_method(cfg, fail)
    cfg.apply_data_rules(fail)
    if cfg.packing is None:
        object.__setattr__(cfg, "packing", cfg.stage == "pt")
    if cfg.bf16 and cfg.fp16:
        fail("fp16", "bf16 and fp16 cannot both be true")
    if cfg.do_train and cfg.dataset is None:
        fail("dataset", "do_train is true but no dataset is given")
    if cfg.do_eval and cfg.eval_dataset is None and cfg.val_size <= 1e-6:
        fail("do_eval", "do_eval needs eval_dataset or val_size > 0")
    if "all" in cfg.lora_target and len(cfg.lora_target) > 1:
        fail("lora_target", "'all' cannot be combined with other module names")
    _check_length(cfg, fail)
    _check_names(cfg, fail)
    _check_kernels(cfg, fail)


#: keys that only the LoRA family's finetuning_type: lora reads (all set = not their default)
_LORA_ONLY = ("loraplus_lr_ratio", "use_rslora", "use_dora", "pissa_init", "pissa_convert", "lora_fa")
_VERA_ONLY = ("vera_rank", "vera_d_initial", "vera_projection_prng_key", "vera_save_projection")


def _check_method(cfg: SftConfig, fail: Callable[[str, str], None]) -> None:
    """Which method keys go with which finetuning_type, and which combinations PEFT cannot train."""
    method = cfg.finetuning_type
    if cfg.quantization_bit is not None and method == "full":
        fail("quantization_bit", "quantization is only compatible with finetuning_type: lora or vera "
                                 f"(got finetuning_type: {method})")
    if method != "lora":
        for key in _LORA_ONLY:
            if getattr(cfg, key) not in (None, False):
                fail(key, f"{key} is only valid for finetuning_type: lora (got finetuning_type: {method})")
    if method != "vera":
        for key in _VERA_ONLY:
            if key in cfg.explicit:
                fail(key, f"{key} is only valid for finetuning_type: vera (got finetuning_type: {method})")
    else:
        for key in ("lora_rank", "lora_alpha"):
            if key in cfg.explicit:
                fail(key, f"{key} is not used by finetuning_type: vera (VeRA's rank is vera_rank, and it has no "
                          "alpha); remove it")
    if cfg.pissa_init and cfg.quantization_bit is not None:
        fail("pissa_init", "pissa_init needs the full-precision weights; it cannot start from a quantized model "
                           "(initialize PiSSA without quantization_bit)")
    if cfg.pissa_convert and not cfg.pissa_init:
        fail("pissa_convert", "pissa_convert converts a PiSSA adapter; set pissa_init: true too")
    if cfg.pissa_convert and cfg.use_dora:
        fail("pissa_convert", "a DoRA adapter cannot be converted to a plain LoRA (its magnitude is tied to the "
                              "base); drop pissa_convert or use_dora")
    if cfg.lora_fa and cfg.loraplus_lr_ratio is not None:
        fail("loraplus_lr_ratio", "LoRA+ sets lora_B's learning rate relative to lora_A's, but lora_fa freezes "
                                  "lora_A; drop loraplus_lr_ratio (or raise learning_rate)")


def _check_length(cfg: SftConfig, fail: Callable[[str, str], None]) -> None:
    """A run must have something to do: no zero-step trainings."""
    if cfg.max_steps == 0:
        fail("max_steps", "max_steps: 0 trains nothing; give a positive number of steps, or -1 to train "
                          "num_train_epochs epochs")
    if cfg.max_steps < 0 and cfg.num_train_epochs <= 0:
        fail("num_train_epochs", f"num_train_epochs: {cfg.num_train_epochs:g} with no max_steps trains nothing; "
                                 "give a positive number of epochs or set max_steps")


def _check_kernels(cfg: SftConfig, fail: Callable[[str, str], None]) -> None:
    """Liger-Kernel must be installed when the recipe asks for it (looked up, not imported)."""
    if cfg.enable_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        fail("enable_liger_kernel", "true needs Liger-Kernel, which is not installed (pip install liger-kernel); "
                                    "or remove the key: npu-ft's own fused kernels (fused_kernels: true) cover "
                                    "the same ops")


def _one_of(value: str, names: Sequence[str]) -> str:
    close = unknown_key_message(value, names, "value").split("; ", 1)
    hint = f"; {close[1]}" if len(close) > 1 else ""
    return f"unknown value {value!r}{hint} (expected one of: {', '.join(names)})"


def _check_names(cfg: SftConfig, fail: Callable[[str, str], None]) -> None:
    """Values that transformers or the data pipeline look up by name, checked before any work."""
    if cfg.lr_scheduler_type not in SCHEDULER_TYPES:
        fail("lr_scheduler_type", _one_of(cfg.lr_scheduler_type, SCHEDULER_TYPES))
    if cfg.optim not in OPTIMIZER_NAMES:
        fail("optim", _one_of(cfg.optim, OPTIMIZER_NAMES))
    for name in cfg.report_to:
        if name not in REPORT_TO_NAMES:
            fail("report_to", _one_of(name, REPORT_TO_NAMES))
    if cfg.template is not None:
        from npu_ft.data.templates import TEMPLATES

        if cfg.template not in TEMPLATES:
            fail("template", f"unknown template {cfg.template!r} (npu-ft has: {', '.join(sorted(TEMPLATES))})")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> SftConfig:
    """Read a LLaMA-Factory style YAML recipe, merge ``key=value`` overrides, validate."""
    from .yaml_io import YamlError, load_yaml_mapping

    source = str(path)
    try:
        data = load_yaml_mapping(path)
    except YamlError as exc:
        raise ConfigError(str(exc)) from None
    sources = {key: source for key in data}
    merged = dict(data)
    for key, value, text in parse_overrides(overrides):
        merged[key] = value
        sources[key] = f"command-line override '{text}'"
    return build_config(merged, source=source, sources=sources)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any, str]]:
    """``["lora_rank=16", "bf16=true"]`` -> ``[("lora_rank", 16, ...), ("bf16", True, ...)]`` (each value
    read as a YAML scalar, with the recipe's YAML rules)."""
    from .yaml_io import YamlError, load_yaml_text

    out = []
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r} is not of the form key=value", source="command line")
        key, raw = text.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {text!r} has an empty key", source="command line")
        try:
            value = load_yaml_text(raw) if raw.strip() else None
        except YamlError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.strip().startswith(("[", "{")):
            value = raw  # "a: b" style strings stay strings
        out.append((key, value, text))
    return out


def build_config(mapping: Mapping[str, Any], source: str = "<dict>",
                 sources: Mapping[str, str] | None = None) -> SftConfig:
    """Validate a flat ``{key: value}`` mapping (already merged) into an :class:`SftConfig`."""
    sources = dict(sources or {})
    for key in mapping:
        if key not in OPTIONS:
            message = unknown_key_message(str(key), OPTIONS)
            message = message.replace(f"'{key}'", f"'{key}' (not a LLaMA-Factory 0.9.5 sft key or an npu-ft key)", 1)
            raise ConfigError(message, source=sources.get(key, source), key=str(key))
    values = {key: coerce_field(OPTIONS[key], raw, sources.get(key, source)) for key, raw in mapping.items()}
    return SftConfig(**values, source=source, explicit=frozenset(mapping), sources=sources)


def explicit_items(cfg: SftConfig) -> Iterable[tuple[str, Any]]:
    """The keys the recipe set and their values, in key order."""
    return ((name, getattr(cfg, name)) for name in OPTIONS if name in cfg.explicit)
