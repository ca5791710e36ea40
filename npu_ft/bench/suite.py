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
from typing import Any

import yaml

METHODS = ("lora", "qlora", "full")
BUILTIN_IMPLEMENTATIONS = ("npu-ft", "reference", "llamafactory", "llamafactory+npu-ft")  # LF: impl_llamafactory.py
#: a custom implementation is named "custom:<module>:<function>" (see npu_ft.bench.impls)
CUSTOM_PREFIX = "custom:"
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

LORA_KEYS = {"r": int, "alpha": (int, float), "dropout": (int, float), "targets": (str, list),
             "use_rslora": bool, "additional_target": (list, type(None))}
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all", "use_rslora": False,
                 "additional_target": None}

#: settings a case carries; (type(s), default). Also the keys a variant may override.
CASE_SETTINGS: dict[str, tuple[Any, Any]] = {
    "dtype": (str, "float32"),
    "seq_len": (int, 128),
    "batch_size": (int, 1),
    "steps": (int, 5),
    "warmup": (int, 1),
    "gradient_checkpointing": (bool, False),
    "checkpoint_policy": ((str, dict), "full"),
    "lora": (dict, None),
    "lr": ((int, float), 1e-4),
    "seed": (int, 0),
    "model_overrides": (dict, None),
    "timeout_s": ((int, float), 3600),
    "data_pool": (int, 4),
}
SUITE_KEYS = {"name": str, "description": str, "models": list, "methods": list, "implementations": list,
              "devices": list, "repeats": int, "tolerances": dict, "cross_device_tolerance": (int, float),
              "variants": list}
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


def _where(path, key) -> str:
    return f"{path or '<suite>'}: key {key!r}"


def _check_type(path, key, value, types) -> None:
    if isinstance(value, bool) and types in (int, (int, float)):
        raise SuiteError(f"{_where(path, key)} must be a number, got {value!r}")
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise SuiteError(f"{_where(path, key)} must be {names}, got {type(value).__name__} {value!r}")


def _norm_dtype(path, key, value) -> str:
    v = _DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
    if v not in DTYPES:
        raise SuiteError(f"{_where(path, key)}: unknown dtype {value!r}; expected one of {', '.join(DTYPES)}")
    return v


def _check_lora(path, key, value) -> dict:
    _check_type(path, key, value, dict)
    out = dict(LORA_DEFAULTS)
    for k, v in value.items():
        if k not in LORA_KEYS:
            raise SuiteError(f"{_where(path, f'{key}.{k}')}: unknown key; expected one of {', '.join(LORA_KEYS)}")
        _check_type(path, f"{key}.{k}", v, LORA_KEYS[k])
        out[k] = v
    if out["r"] <= 0:
        raise SuiteError(f"{_where(path, f'{key}.r')} must be > 0, got {out['r']}")
    if not 0.0 <= float(out["dropout"]) < 1.0:
        raise SuiteError(f"{_where(path, f'{key}.dropout')} must be in [0, 1), got {out['dropout']}")
    return out


def _check_policy(path, key, value) -> str | dict:
    from npu_ft.modules.checkpointing import POLICIES

    per_method = value if isinstance(value, dict) else {None: value}
    for method, policy in per_method.items():
        where = key if method is None else f"{key}.{method}"
        if method is not None and method not in METHODS:
            raise SuiteError(f"{_where(path, where)}: unknown method; expected one of {', '.join(METHODS)}")
        if policy not in POLICIES:
            raise SuiteError(f"{_where(path, where)}: unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return copy.deepcopy(value)


def _case_policy(value: str | dict, method: str, implementation: str) -> str:
    """The checkpointing policy one case runs: npu-ft follows the suite, the others run "full"."""
    if implementation != "npu-ft":
        return "full"
    return value.get(method, "full") if isinstance(value, dict) else value


def _check_settings(path, prefix, raw: dict) -> dict:
    """Validate the case settings found in ``raw`` (top level or one variant)."""
    out = {}
    for key, value in raw.items():
        types, _ = CASE_SETTINGS[key]
        where = f"{prefix}{key}"
        if key == "dtype":
            out[key] = _norm_dtype(path, where, value)
            continue
        if key == "lora":
            out[key] = _check_lora(path, where, value)
            continue
        _check_type(path, where, value, types)
        if key == "checkpoint_policy":
            out[key] = _check_policy(path, where, value)
            continue
        if key in ("seq_len", "batch_size", "steps", "data_pool") and value < 1:
            raise SuiteError(f"{_where(path, where)} must be >= 1, got {value}")
        if key in ("warmup", "seed") and value < 0:
            raise SuiteError(f"{_where(path, where)} must be >= 0, got {value}")
        if key in ("lr", "timeout_s") and value <= 0:
            raise SuiteError(f"{_where(path, where)} must be > 0, got {value}")
        out[key] = copy.deepcopy(value)
    return out


def _check_names(path, key, values, allowed, what) -> list[str]:
    _check_type(path, key, values, list)
    if not values:
        raise SuiteError(f"{_where(path, key)} must list at least one {what}")
    out = []
    for v in values:
        if not isinstance(v, str):
            raise SuiteError(f"{_where(path, key)}: {what} names must be strings, got {v!r}")
        name = v.strip().lower() if not v.startswith(CUSTOM_PREFIX) else v.strip()
        if allowed is not None and name not in allowed:
            raise SuiteError(f"{_where(path, key)}: unknown {what} {v!r}; expected one of {', '.join(allowed)}")
        if name in out:
            raise SuiteError(f"{_where(path, key)}: {what} {v!r} is listed twice")
        out.append(name)
    return out


def parse_suite(data: Any, path: str | None = None, check_devices: bool = True) -> Suite:
    """Validate a loaded suite mapping and expand it into cases.

    ``check_devices``: also check that every listed device can be used on this machine (an
    unavailable device is a clear error before anything runs).
    """
    from .shapes import known_models

    if not isinstance(data, dict):
        raise SuiteError(f"{path or '<suite>'}: a suite must be a mapping of keys, got {type(data).__name__}")
    allowed = set(SUITE_KEYS) | set(CASE_SETTINGS)
    for key in data:
        if key not in allowed:
            raise SuiteError(f"{_where(path, key)}: unknown key; expected one of {', '.join(sorted(allowed))}")
    for key in REQUIRED:
        if key not in data:
            raise SuiteError(f"{path or '<suite>'}: missing required key {key!r}")
    for key, types in SUITE_KEYS.items():
        if key in data:
            _check_type(path, key, data[key], types)

    name = str(data.get("name") or (Path(path).stem if path else "suite"))
    models = _check_names(path, "models", data["models"], None, "model")
    known = known_models()
    for m in models:
        if m not in known:
            raise SuiteError(f"{_where(path, 'models')}: unknown model {m!r}; expected one of {', '.join(known)}")
    methods = _check_names(path, "methods", data["methods"], METHODS, "method")
    impls = _check_names(path, "implementations", data["implementations"], None, "implementation")
    for impl in impls:
        if impl not in BUILTIN_IMPLEMENTATIONS and not impl.startswith(CUSTOM_PREFIX):
            raise SuiteError(
                f"{_where(path, 'implementations')}: unknown implementation {impl!r}; expected one of "
                f"{', '.join(BUILTIN_IMPLEMENTATIONS)} or '{CUSTOM_PREFIX}<module>:<function>'"
            )
        if impl.startswith(CUSTOM_PREFIX) and impl[len(CUSTOM_PREFIX):].count(":") != 1:
            raise SuiteError(f"{_where(path, 'implementations')}: {impl!r} must be "
                             f"'{CUSTOM_PREFIX}<module>:<function>'")
    devices = _check_names(path, "devices", data.get("devices", ["cpu"]), DEVICES, "device")
    if check_devices:
        from npu_ft.device import all_backends

        for dev in devices:
            reason = all_backends()[dev].unavailable_reason()
            if reason is not None:
                raise SuiteError(f"{_where(path, 'devices')}: device {dev!r} is unavailable here: {reason}")

    repeats = int(data.get("repeats", 1))
    if repeats < 1:
        raise SuiteError(f"{_where(path, 'repeats')} must be >= 1, got {repeats}")

    base = {k: (copy.deepcopy(default) if default is not None else None) for k, (_, default) in CASE_SETTINGS.items()}
    base["lora"] = dict(LORA_DEFAULTS)
    base["model_overrides"] = {}
    base.update(_check_settings(path, "", {k: v for k, v in data.items() if k in CASE_SETTINGS}))

    variants_raw = data.get("variants") or [{}]
    variants = []
    for i, var in enumerate(variants_raw):
        if not isinstance(var, dict):
            raise SuiteError(f"{_where(path, f'variants[{i}]')} must be a mapping, got {var!r}")
        for key in var:
            if key not in CASE_SETTINGS:
                raise SuiteError(
                    f"{_where(path, f'variants[{i}].{key}')}: unknown key; expected one of {', '.join(CASE_SETTINGS)}"
                )
        settings = copy.deepcopy(base)
        settings.update(_check_settings(path, f"variants[{i}].", var))
        variants.append(settings)

    tolerances = copy.deepcopy(DEFAULT_TOLERANCES)
    for method, tol in (data.get("tolerances") or {}).items():
        if method not in METHODS:
            raise SuiteError(
                f"{_where(path, f'tolerances.{method}')}: unknown method; expected one of {', '.join(METHODS)}"
            )
        _check_type(path, f"tolerances.{method}", tol, (int, float))
        for dt in DTYPES:
            tolerances[dt][method] = float(tol)
    cross = dict(DEFAULT_CROSS_DEVICE_TOLERANCES)
    if "cross_device_tolerance" in data:
        cross = {dt: float(data["cross_device_tolerance"]) for dt in DTYPES}

    cases = []
    for vi, settings in enumerate(variants):
        for model, method, device, impl in itertools.product(models, methods, devices, impls):
            case_settings = dict(settings, checkpoint_policy=_case_policy(settings["checkpoint_policy"], method, impl))
            cases.append(
                BenchCase(
                    suite=name,
                    model=model,
                    method=method,
                    implementation=impl,
                    device=device,
                    variant=vi,
                    **case_settings,
                )
            )
    return Suite(
        name=name,
        description=str(data.get("description", "")),
        path=path,
        cases=cases,
        repeats=repeats,
        tolerances=tolerances,
        cross_device_tolerance=cross,
    )


def load_suite(path: str | Path, check_devices: bool = True) -> Suite:
    """Read and validate a suite YAML file (``yaml.safe_load``)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SuiteError(f"{p}: cannot read suite file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SuiteError(f"{p}: not valid YAML: {exc}") from None
    return parse_suite(data, str(p), check_devices=check_devices)
