"""Benchmark suites: the YAML file that says what to run, validated and expanded into cases.

A suite is a matrix: every model × method × implementation × device (× variant) is one case, and
every case runs in a fresh process (see :mod:`npu_ft.bench.runner`).

.. code-block:: yaml

    name: cpu-qwen2.5-0.5b
    description: what this suite answers
    models: [qwen2.5-0.5b]            # shape presets, random init (see npu_ft.bench.shapes)
    methods: [lora, qlora]            # lora | qlora | full
    implementations: [npu-ft, reference]
    devices: [cpu]                    # cpu | cuda | npu
    dtype: float32                    # float32 | bfloat16 | float16
    seq_len: 256
    batch_size: 1
    steps: 6                          # timed steps (after warmup)
    warmup: 2
    repeats: 3                        # fresh process per case per repeat, interleaved
    gradient_checkpointing: true
    checkpoint_policy: full           # npu-ft only: full | selective, or per method {lora: selective}
    lora: {r: 16, alpha: 32, dropout: 0.0, targets: all, use_rslora: false}
    lr: 1.0e-4
    seed: 0
    timeout_s: 1800                   # per case process
    model_overrides: {num_hidden_layers: 4}   # optional: shrink a preset
    tolerances: {lora: 1.0e-4, full: 1.0e-4, qlora: 1.0e-3}   # loss parity, relative
    variants:                         # optional: extra settings, one set of cases each
      - {seq_len: 1024}
      - {seq_len: 4096, batch_size: 1}

Every key is checked: an unknown key, method, implementation, device, dtype or model names the key
and the file in a :class:`SuiteError`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any, Literal

from npu_ft.config.schema import ConfigError, config_field, field_infos, parse_fields

from .registry import CUSTOM_PREFIX, IMPLEMENTATIONS

METHODS = ("lora", "qlora", "full")
#: implementations a suite can name (npu_ft.bench.registry), and "custom:<module>:<function>"
BUILTIN_IMPLEMENTATIONS = tuple(IMPLEMENTATIONS)
DEVICES = ("cpu", "cuda", "npu")
DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}

#: loss-parity tolerance (max relative loss difference over the steps), per dtype and method
DEFAULT_TOLERANCES = {
    "float32": {"lora": 1e-4, "full": 1e-4, "qlora": 1e-3},
    "bfloat16": {"lora": 2e-2, "full": 2e-2, "qlora": 3e-2},
    "float16": {"lora": 1e-2, "full": 1e-2, "qlora": 2e-2},
}
#: tolerance for the same implementation across devices (different kernels, different order of sums)
DEFAULT_CROSS_DEVICE_TOLERANCES = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 2e-2}



def _dtype_alias(value: Any) -> Any:
    return _DTYPE_ALIASES.get(str(value).lower(), str(value).lower()) if isinstance(value, str) else value


@dataclasses.dataclass
class LoraSettings:
    """The ``lora:`` mapping of a suite (LLaMA-Factory's lora_* keys, short names)."""

    r: int = config_field(8, "LoRA rank.", minimum=0, exclusive_minimum=True)
    alpha: float = config_field(16, "LoRA alpha.")
    dropout: float = config_field(0.0, "Dropout on the LoRA input.", minimum=0.0, maximum=1.0,
                                  exclusive_maximum=True)
    targets: str | list[str] = config_field("all", "'all' or a list of module-name suffixes.")
    use_rslora: bool = config_field(False, "Rank-stabilised scaling.")
    additional_target: list[str] | None = config_field(None, "Modules trained in full (modules_to_save).")


LORA_DEFAULTS = dataclasses.asdict(LoraSettings())


def _check_policy(value: Any, where: str | None, key: str) -> str | dict:
    """``full | selective``, or one per method (``{lora: selective, qlora: full}``)."""
    from npu_ft.config.npu_ft_args import CHECKPOINT_POLICIES

    if not isinstance(value, (str, dict)):
        raise ConfigError(f"must be str or dict, got {type(value).__name__} {value!r}", source=where, key=key)
    per_method = value if isinstance(value, dict) else {None: value}
    for method, policy in per_method.items():
        at = key if method is None else f"{key}.{method}"
        if method is not None and method not in METHODS:
            raise ConfigError(f"unknown method; expected one of {', '.join(METHODS)}", source=where, key=at)
        if policy not in CHECKPOINT_POLICIES:
            raise ConfigError(f"unknown policy {policy!r}; expected one of {', '.join(CHECKPOINT_POLICIES)}",
                              source=where, key=at)
    return copy.deepcopy(value)


@dataclasses.dataclass
class CaseSettings:
    """Settings every case carries; the top level of a suite sets them, a variant may override them."""

    dtype: Literal["float32", "bfloat16", "float16"] = config_field(
        "float32", "Training dtype (aliases fp32, bf16, fp16).", normalize=_dtype_alias)
    seq_len: int = config_field(128, "Tokens per sequence.", minimum=1)
    batch_size: int = config_field(1, "Sequences per step.", minimum=1)
    steps: int = config_field(5, "Timed steps (after warmup).", minimum=1)
    warmup: int = config_field(1, "Untimed steps first.", minimum=0)
    gradient_checkpointing: bool = config_field(False, "Checkpoint every decoder layer.")
    checkpoint_policy: str | dict = config_field(
        "full", "npu-ft's checkpointing policy (full | selective), or one per method; the other "
                "implementations always checkpoint the transformers way.", check=_check_policy)
    lora: LoraSettings = config_field(doc="LoRA settings.", default_factory=LoraSettings)
    lr: float = config_field(1e-4, "Learning rate.", minimum=0.0, exclusive_minimum=True)
    seed: int = config_field(0, "Seed of weights and data.", minimum=0)
    model_overrides: dict[str, Any] = config_field(doc="Changes to the model preset's config (e.g. layers).",
                                                   default_factory=dict)
    timeout_s: float = config_field(3600, "Seconds one case process may take.", minimum=0.0,
                                    exclusive_minimum=True)
    data_pool: int = config_field(4, "Distinct random batches cycled through.", minimum=1)


def _check_name_list(allowed: tuple[str, ...] | None, what: str) -> Any:
    """A validator for a list of names: not empty, no repeats, each known (``allowed``)."""

    def check(values: Any, where: str | None, key: str) -> list[str]:
        if not isinstance(values, list):
            raise ConfigError(f"must be list, got {type(values).__name__} {values!r}", source=where, key=key)
        if not values:
            raise ConfigError(f"must list at least one {what}", source=where, key=key)
        out: list[str] = []
        for v in values:
            if not isinstance(v, str):
                raise ConfigError(f"{what} names must be strings, got {v!r}", source=where, key=key)
            name = v.strip() if v.startswith(CUSTOM_PREFIX) else v.strip().lower()
            if allowed is not None and name not in allowed:
                raise ConfigError(f"unknown {what} {v!r}; expected one of {', '.join(allowed)}", source=where,
                                  key=key)
            if name in out:
                raise ConfigError(f"{what} {v!r} is listed twice", source=where, key=key)
            out.append(name)
        return out

    return check


@dataclasses.dataclass
class SuiteFile(CaseSettings):
    """The keys of a suite file (the case settings plus what to run and how often)."""

    name: str | None = config_field(None, "Suite name (default: the file's stem).")
    description: str = config_field("", "What the suite answers.")
    models: list[str] = config_field(doc="Shape presets (npu_ft.bench.shapes), random init.", default_factory=list,
                                     check=_check_name_list(None, "model"))
    methods: list[str] = config_field(doc="lora | qlora | full.", default_factory=list,
                                      check=_check_name_list(METHODS, "method"))
    implementations: list[str] = config_field(doc="npu-ft, reference, llamafactory, ... or custom:<mod>:<fn>.",
                                              default_factory=list, check=_check_name_list(None, "implementation"))
    devices: list[str] = config_field(doc="cpu | cuda | npu.", default_factory=lambda: ["cpu"],
                                      check=_check_name_list(DEVICES, "device"))
    repeats: int = config_field(1, "Fresh process per case per repeat, interleaved.", minimum=1)
    tolerances: dict[Literal["lora", "qlora", "full"], float] | None = config_field(
        None, "Loss-parity tolerance per method (relative), for every dtype.")
    cross_device_tolerance: float | None = config_field(None, "Tolerance between devices, every dtype.")
    variants: list[dict[str, Any]] | None = config_field(None, "Extra settings, one set of cases each.")


REQUIRED = ("models", "methods", "implementations")


class SuiteError(ValueError):
    """A suite file that cannot be run; the message names the file and the key."""


@dataclasses.dataclass
class BenchCase:
    """One (model, method, implementation, device, settings) to run in its own process."""

    suite: str
    model: str
    method: str
    implementation: str
    device: str
    dtype: str = "float32"
    seq_len: int = 128
    batch_size: int = 1
    steps: int = 5
    warmup: int = 1
    gradient_checkpointing: bool = False
    #: npu-ft's gradient-checkpointing policy (npu_ft.modules.checkpointing); other implementations
    #: always checkpoint the transformers way ("full")
    checkpoint_policy: str = "full"
    lora: dict = dataclasses.field(default_factory=lambda: dict(LORA_DEFAULTS))
    lr: float = 1e-4
    seed: int = 0
    model_overrides: dict = dataclasses.field(default_factory=dict)
    timeout_s: float = 3600
    data_pool: int = 4
    variant: int = 0

    @property
    def case_id(self) -> str:
        gc = "nogc" if not self.gradient_checkpointing else "gc" if self.checkpoint_policy == "full" else (
            f"gc-{self.checkpoint_policy}")
        return (f"{self.model}/{self.method}/{self.implementation}/{self.device}/{self.dtype}"
                f"/s{self.seq_len}b{self.batch_size}/{gc}/v{self.variant}")

    @property
    def parity_group(self) -> tuple:
        """Cases that must give the same loss curve apart from implementation and device."""
        return (self.model, self.method, self.dtype, self.seq_len, self.batch_size,
                self.gradient_checkpointing, self.variant)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["case_id"] = self.case_id
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BenchCase:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass
class Suite:
    name: str
    description: str
    path: str | None
    cases: list[BenchCase]
    repeats: int
    tolerances: dict  # dtype -> method -> tol
    cross_device_tolerance: dict  # dtype -> tol

    def tolerance(self, method: str, dtype: str) -> float:
        return float(self.tolerances[dtype][method])


def _case_policy(value: str | dict, method: str, implementation: str) -> str:
    """The checkpointing policy one case runs: npu-ft follows the suite, the others run "full"."""
    if implementation != "npu-ft":
        return "full"
    return value.get(method, "full") if isinstance(value, dict) else value


def _settings(values: dict[str, Any]) -> dict[str, Any]:
    """Case settings as plain values (the lora mapping as a dict)."""
    out = {name: copy.deepcopy(values[name]) for name in field_infos(CaseSettings)}
    out["lora"] = dataclasses.asdict(out["lora"])
    return out


def parse_suite(data: Any, path: str | None = None, check_devices: bool = True) -> Suite:
    """Validate a loaded suite mapping and expand it into cases.

    ``check_devices``: also check that every listed device can be used on this machine (an
    unavailable device is a clear error before anything runs).
    """
    try:
        return _parse_suite(data, path, check_devices)
    except ConfigError as exc:
        raise SuiteError(str(exc)) from None


def _parse_suite(data: Any, path: str | None, check_devices: bool) -> Suite:
    from .shapes import known_models

    where = path or "<suite>"
    if not isinstance(data, dict):
        raise SuiteError(f"{where}: a suite must be a mapping of keys, got {type(data).__name__}")
    for key in REQUIRED:
        if key not in data:
            raise SuiteError(f"{where}: missing required key {key!r}")
    top = SuiteFile(**parse_fields(SuiteFile, data, where, strict=True, unknown="; expected one of "
                                   + ", ".join(sorted(field_infos(SuiteFile)))))
    known = known_models()
    for m in top.models:
        if m not in known:
            raise ConfigError(f"unknown model {m!r}; expected one of {', '.join(known)}", source=where, key="models")
    for impl in top.implementations:
        if impl not in BUILTIN_IMPLEMENTATIONS and not impl.startswith(CUSTOM_PREFIX):
            raise ConfigError(f"unknown implementation {impl!r}; expected one of "
                              f"{', '.join(BUILTIN_IMPLEMENTATIONS)} or '{CUSTOM_PREFIX}<module>:<function>'",
                              source=where, key="implementations")
        if impl.startswith(CUSTOM_PREFIX) and impl[len(CUSTOM_PREFIX):].count(":") != 1:
            raise ConfigError(f"{impl!r} must be '{CUSTOM_PREFIX}<module>:<function>'", source=where,
                              key="implementations")
    if check_devices:
        from npu_ft.device import all_backends

        for dev in top.devices:
            reason = all_backends()[dev].unavailable_reason()
            if reason is not None:
                raise ConfigError(f"device {dev!r} is unavailable here: {reason}", source=where, key="devices")

    base = _settings({name: getattr(top, name) for name in field_infos(CaseSettings)})
    variants = []
    for i, var in enumerate(top.variants or [{}]):
        changed = parse_fields(CaseSettings, var, where, strict=True, prefix=f"variants[{i}].",
                               unknown="; expected one of " + ", ".join(field_infos(CaseSettings)))
        settings = copy.deepcopy(base)
        settings.update({k: dataclasses.asdict(v) if isinstance(v, LoraSettings) else copy.deepcopy(v)
                         for k, v in changed.items()})
        variants.append(settings)

    tolerances = copy.deepcopy(DEFAULT_TOLERANCES)
    for method, tol in (top.tolerances or {}).items():
        for dt in DTYPES:
            tolerances[dt][method] = float(tol)
    cross = dict(DEFAULT_CROSS_DEVICE_TOLERANCES)
    if top.cross_device_tolerance is not None:
        cross = {dt: float(top.cross_device_tolerance) for dt in DTYPES}

    name = str(top.name or (Path(path).stem if path else "suite"))
    cases = []
    for vi, settings in enumerate(variants):
        for model, method, device, impl in itertools.product(top.models, top.methods, top.devices,
                                                             top.implementations):
            case_settings = dict(settings, checkpoint_policy=_case_policy(settings["checkpoint_policy"], method, impl))
            cases.append(BenchCase(suite=name, model=model, method=method, implementation=impl, device=device,
                                   variant=vi, **case_settings))
    return Suite(name=name, description=str(top.description), path=path, cases=cases, repeats=top.repeats,
                 tolerances=tolerances, cross_device_tolerance=cross)


def load_suite(path: str | Path, check_devices: bool = True) -> Suite:
    """Read and validate a suite YAML file (safe YAML, a duplicated key is an error)."""
    from npu_ft.config.yaml_io import YamlError, load_yaml_file

    p = Path(path)
    try:
        data = load_yaml_file(p)
    except YamlError as exc:
        message = str(exc)
        if "invalid YAML" in message:
            message = message.replace("invalid YAML", "not valid YAML", 1)
        elif "file not found" in message or "cannot read" in message or "directory" in message:
            message = f"{p}: cannot read suite file ({message.split(': ', 1)[1]})"
        raise SuiteError(message) from None
    return parse_suite(data, str(p), check_devices=check_devices)
