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
    memory_probe: false               # cpu: + one process per case measuring live tensors (tensor_mem_bytes)
    gradient_checkpointing: true
    checkpoint_policy: full           # off | full | selective, or per method {lora: selective}
    fused_kernels: true               # npu-ft's fused RMSNorm/RoPE/SwiGLU ops (npu-ft lanes only)
    adapter: lora                     # lora | dora | pissa | lora_fa | vera (methods lora and qlora)
    optim: adamw_torch                # adamw_torch | adamw_8bit | adamw_8bit_all
    data: {mode: sft, dataset: alpaca-synth, packing: true}   # or mode: random (default)
    lora: {r: 16, alpha: 32, dropout: 0.0, targets: all, use_rslora: false}
    lr: 1.0e-4
    seed: 0
    timeout_s: 1800                   # per case process
    model_overrides: {num_hidden_layers: 4}   # optional: shrink a preset
    tolerances: {lora: 1.0e-4, full: 1.0e-4, qlora: 1.0e-3}   # loss parity, relative
    variants:                         # optional: extra settings, one set of cases each
      - {seq_len: 1024}
      - {seq_len: 4096, batch_size: 1}
    sweep:                            # optional: every combination, one set of cases each
      checkpoint_policy: [off, full, selective]
      batch_size: [1, 2]
    sweep_per_implementation:         # optional: another sweep for one implementation; a list = these points
      llamafactory: [{checkpoint_policy: off}, {checkpoint_policy: full}, {checkpoint_policy: full, batch_size: 2}]

A variant or sweep point may also set ``method`` (one of ``methods``' values): that point then runs
that method only, once, whatever ``methods`` lists -- how one suite puts full fine-tuning, QLoRA and
the LoRA family side by side (``sweep_per_implementation.npu-ft: [{method: full}, {adapter: dora},
{method: qlora, adapter: dora}, ...]``).

A policy an implementation cannot run (``selective`` outside npu-ft) runs as ``full`` there, and a
case that then repeats another one exactly is run once. Likewise ``fused_kernels`` (npu-ft's fused
decoder-block ops, on by default as in ``npu-ft train``) only means something to ``npu-ft`` and
``llamafactory+npu-ft`` (and custom implementations, which get the value); the others run their own
modules and record the default, so ``fused_kernels: [true, false]`` runs them once.

Every key is checked: an unknown key, method, implementation, device, dtype or model names the key
and the file in a :class:`SuiteError`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Literal, get_args

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
    vera_r: int = config_field(256, "VeRA's rank (adapter: vera).", minimum=0, exclusive_minimum=True)


LORA_DEFAULTS = dataclasses.asdict(LoraSettings())


#: adapters of the LoRA family a lora / qlora case can train (npu_ft.bench.impls_methods); lora = plain LoRA
Adapter = Literal["lora", "dora", "pissa", "lora_fa", "vera"]
ADAPTERS = get_args(Adapter)
#: optimizers: torch's AdamW; 8-bit AdamW (npu-ft's, bitsandbytes' in the reference lane) with transformers'
#: rule (nn.Embedding weights keep 32-bit states, as npu-ft train); or every large parameter in 8 bits
Optimizer = Literal["adamw_torch", "adamw_8bit", "adamw_8bit_all"]
OPTIMIZERS = get_args(Optimizer)
#: the implementations that can run an adapter other than lora or an optimizer other than adamw_torch
METHOD_IMPLEMENTATIONS = ("npu-ft", "reference")


def method_name(method: str, adapter: str = "lora", optim: str = "adamw_torch") -> str:
    """What a case trains, in one word for tables and plots: "lora", "qlora", "full", "dora",
    "qdora" (DoRA on an NF4 base), "qlora_fa", "qpissa", "qvera", with "+adamw_8bit" (or
    "+adamw_8bit_all") when the optimizer keeps 8-bit states."""
    name = method if adapter == "lora" else ("q" if method == "qlora" else "") + adapter
    return name if optim == "adamw_torch" else f"{name}+{optim}"


#: checkpointing policies a case can run: off (no checkpointing) and npu-ft's runtime policies
CASE_POLICIES = ("off", "full", "selective")


def _check_policy(value: Any, where: str | None, key: str) -> str | dict:
    """``off | full | selective``, or one per method (``{lora: selective, qlora: full}``); YAML's
    ``off`` (a boolean false) reads as "off"."""
    if value is False:
        value = "off"
    if isinstance(value, dict):
        value = {m: "off" if p is False else p for m, p in value.items()}
    if not isinstance(value, (str, dict)):
        raise ConfigError(f"must be str or dict, got {type(value).__name__} {value!r}", source=where, key=key)
    per_method = value if isinstance(value, dict) else {None: value}
    for method, policy in per_method.items():
        at = key if method is None else f"{key}.{method}"
        if method is not None and method not in METHODS:
            raise ConfigError(f"unknown method; expected one of {', '.join(METHODS)}", source=where, key=at)
        if policy not in CASE_POLICIES:
            raise ConfigError(f"unknown policy {policy!r}; expected one of {', '.join(CASE_POLICIES)}",
                              source=where, key=at)
    return copy.deepcopy(value)


@dataclasses.dataclass
class DataSettings:
    """The ``data:`` mapping of a suite: what the batches hold."""

    mode: Literal["random", "sft"] = config_field(
        "random", "random: random token ids, every position labelled. sft: examples of a dataset_info.json "
                  "dataset through npu-ft's data pipeline (qwen template, prompt tokens masked).")
    dataset: str = config_field(
        "alpaca-synth", "sft: alpaca-synth (generated, alpaca-like lengths), demo (npu-ft's shipped demo "
                        "data), or a dataset name in dataset_dir's dataset_info.json.")
    dataset_dir: str | None = config_field(None, "sft: folder with dataset_info.json (for a named dataset).")
    packing: bool = config_field(True, "sft: pack examples into seq_len sequences (else one example per row, "
                                       "cut at seq_len, padded per batch).")
    examples: int = config_field(512, "sft: examples generated for alpaca-synth.", minimum=1)
    template: str = config_field("qwen", "sft: chat template.")


DATA_DEFAULTS = dataclasses.asdict(DataSettings())


@dataclasses.dataclass
class CaseSettings:
    """Settings every case carries; the top level of a suite sets them, a variant may override them."""

    dtype: Literal["float32", "bfloat16", "float16"] = config_field(
        "float32", "Training dtype (aliases fp32, bf16, fp16).", normalize=_dtype_alias)
    seq_len: int = config_field(128, "Tokens per sequence.", minimum=1)
    batch_size: int = config_field(1, "Sequences per step.", minimum=1)
    steps: int = config_field(5, "Timed steps (after warmup).", minimum=1)
    warmup: int = config_field(1, "Untimed steps first.", minimum=0)
    gradient_checkpointing: bool = config_field(False, "Checkpoint every decoder layer (false = policy off).")
    checkpoint_policy: str | dict = config_field(
        "full", "Checkpointing policy: off | full | selective, or one per method. A policy set here without "
                "gradient_checkpointing beside it turns checkpointing on (off: off). Implementations "
                "without selective (reference, llamafactory) run full instead.", check=_check_policy)
    fused_kernels: bool = config_field(
        True, "npu-ft's fused decoder-block ops (RMSNorm + residual add, RoPE, SwiGLU), as npu-ft train's "
              "fused_kernels key. Only npu-ft and llamafactory+npu-ft (and custom implementations) use it; the "
              "others run transformers' modules whatever it says.")
    adapter: Adapter = config_field(
        "lora", "The LoRA-family method of a lora or qlora case: lora (plain), dora (use_dora), pissa "
                "(pissa_init, 16 fast SVD iterations), lora_fa (lora_A frozen), vera (VeRA, rank lora.vera_r, "
                "default 256). npu-ft and reference (PEFT) lanes only.")
    optim: Optimizer = config_field(
        "adamw_torch", "The optimizer: torch's AdamW; adamw_8bit = npu-ft's AdamW8bit (reference lane: "
                       "bitsandbytes' AdamW8bit) with nn.Embedding weights on 32-bit states as npu-ft train and "
                       "transformers do; adamw_8bit_all = every parameter of 4096+ elements on 8-bit states "
                       "(bitsandbytes' own default). npu-ft and reference lanes only.")
    data: DataSettings = config_field(doc="What the batches hold.", default_factory=DataSettings)
    lora: LoraSettings = config_field(doc="LoRA settings.", default_factory=LoraSettings)
    lr: float = config_field(1e-4, "Learning rate.", minimum=0.0, exclusive_minimum=True)
    seed: int = config_field(0, "Seed of weights and data.", minimum=0)
    model_overrides: dict[str, Any] = config_field(doc="Changes to the model preset's config (e.g. layers).",
                                                   default_factory=dict)
    timeout_s: float = config_field(3600, "Seconds one case process may take.", minimum=0.0,
                                    exclusive_minimum=True)
    data_pool: int = config_field(4, "Distinct random batches cycled through (random data).", minimum=1)


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
    memory_probe: bool = config_field(
        False, "CPU cases: one more process per case after the repeats, with glibc's mmap threshold fixed, whose "
               "training increment without the library pages it maps is the live tensors plus the runtime (what "
               "an accelerator's allocator reports): results column tensor_mem_bytes.")
    tolerances: dict[Literal["lora", "qlora", "full"], float] | None = config_field(
        None, "Loss-parity tolerance per method (relative), for every dtype.")
    cross_device_tolerance: float | None = config_field(None, "Tolerance between devices, every dtype.")
    variants: list[dict[str, Any]] | None = config_field(None, "Extra settings, one set of cases each.")
    sweep: dict[str, list[Any]] | list[dict[str, Any]] | None = config_field(
        None, "Case settings -> values: every combination is one set of cases (inside every variant); or a list "
              "of settings mappings: exactly those points.")
    sweep_per_implementation: dict[str, dict[str, list[Any]] | list[dict[str, Any]]] | None = config_field(
        None, "Implementation -> its own sweep (instead of sweep).")


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
    #: the gradient-checkpointing policy when gradient_checkpointing is on (npu_ft.modules.checkpointing):
    #: full | selective (npu-ft, llamafactory+npu-ft); the others always checkpoint "full"
    checkpoint_policy: str = "full"
    #: npu-ft's fused decoder-block ops (npu_ft.modules.fused_blocks) in the npu-ft lanes; changes the
    #: numbers only within fp32 rounding, so it is not part of the parity group
    fused_kernels: bool = True
    #: the LoRA-family method (ADAPTERS) of a lora / qlora case
    adapter: str = "lora"
    #: the optimizer (OPTIMIZERS)
    optim: str = "adamw_torch"
    data: dict = dataclasses.field(default_factory=lambda: dict(DATA_DEFAULTS))
    lora: dict = dataclasses.field(default_factory=lambda: dict(LORA_DEFAULTS))
    lr: float = 1e-4
    seed: int = 0
    model_overrides: dict = dataclasses.field(default_factory=dict)
    timeout_s: float = 3600
    data_pool: int = 4
    #: the variant's index, or "<variant>.<sweep point>" in a suite with a sweep
    variant: int | str = 0

    @property
    def policy(self) -> str:
        """The checkpointing that runs: off, full or selective."""
        return self.checkpoint_policy if self.gradient_checkpointing else "off"

    @property
    def method_name(self) -> str:
        """"dora", "qdora", "full+adamw_8bit", ... (:func:`method_name`)."""
        return method_name(self.method, self.adapter, self.optim)

    @property
    def data_tag(self) -> str:
        """"random", or e.g. "sft-alpaca-synth-packed"."""
        d = {**DATA_DEFAULTS, **(self.data or {})}
        if d["mode"] == "random":
            return "random"
        return f"sft-{d['dataset']}-{'packed' if d['packing'] else 'unpacked'}"

    @property
    def case_id(self) -> str:
        gc = "nogc" if not self.gradient_checkpointing else "gc" if self.checkpoint_policy == "full" else (
            f"gc-{self.checkpoint_policy}")
        data = "" if self.data_tag == "random" else f"/{self.data_tag}"
        fused = "" if self.fused_kernels else "/nofused"  # the defaults leave the id as it was
        adapter = "" if self.adapter == "lora" else f"/{self.adapter}"
        optim = "" if self.optim == "adamw_torch" else f"/{self.optim}"
        return (f"{self.model}/{self.method}/{self.implementation}/{self.device}/{self.dtype}"
                f"/s{self.seq_len}b{self.batch_size}/{gc}{data}{fused}{adapter}{optim}/v{self.variant}")

    @property
    def parity_group(self) -> tuple:
        """Cases that must give the same loss curve: everything that changes the numbers, not the
        implementation, device, checkpointing policy, fused kernels (fp32 rounding only) or variant number."""
        group = (self.model, self.method, self.dtype, self.seq_len, self.batch_size, self.data_tag,
                 json.dumps(self.data, sort_keys=True), self.lr, self.seed, self.steps + self.warmup,
                 json.dumps(self.lora, sort_keys=True), json.dumps(self.model_overrides, sort_keys=True))
        if (self.adapter, self.optim) != ("lora", "adamw_torch"):  # the defaults leave the key as it was
            group += (self.adapter, self.optim)
        return group

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
    memory_probe: bool = False  # SuiteFile.memory_probe

    def tolerance(self, method: str, dtype: str) -> float:
        return float(self.tolerances[dtype][method])


def _case_policy(value: str | dict, method: str, implementation: str) -> str:
    """The checkpointing policy one case runs: off | full | selective; "selective" only where the
    implementation has it (npu_ft.bench.registry), else "full"."""
    from .registry import supports_policy

    policy = value.get(method, "full") if isinstance(value, dict) else value
    return policy if supports_policy(implementation, policy) else "full"


def _case_fused_kernels(value: bool, implementation: str) -> bool:
    """``fused_kernels`` of one case: the suite's value where the implementation has npu-ft's fused
    decoder-block ops, else the default (true) -- it runs its own modules either way."""
    from .registry import supports_fused_kernels

    return bool(value) if supports_fused_kernels(implementation) else True


def _settings(values: dict[str, Any]) -> dict[str, Any]:
    """Case settings as plain values (the lora and data mappings as dicts)."""
    out = {name: copy.deepcopy(values[name]) for name in field_infos(CaseSettings)}
    return _plain(out)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
            for k, v in values.items()}


def _apply(settings: dict[str, Any], changed: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the keys of one variant or sweep point; a checkpoint_policy given without
    gradient_checkpointing switches checkpointing on (off: off)."""
    out = copy.deepcopy(settings)
    out.update(copy.deepcopy(_plain(changed)))
    if "checkpoint_policy" in changed and "gradient_checkpointing" not in changed:
        policy = changed["checkpoint_policy"]
        out["gradient_checkpointing"] = not (policy == "off" or (isinstance(policy, dict)
                                                                 and set(policy.values()) == {"off"}))
    return out


def _parse_point(point: dict[str, Any], where: str, prefix: str, unknown: str) -> dict[str, Any]:
    """One variant or sweep point: case settings, and optionally the ``method`` it runs."""
    point = dict(point)
    method = point.pop("method", None)
    out = parse_fields(CaseSettings, point, where, strict=True, prefix=prefix, unknown=unknown)
    if method is not None:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}", source=where,
                              key=f"{prefix}method")
        out["method"] = method
    return out


def _sweep_points(sweep: dict[str, list[Any]] | list[dict[str, Any]] | None, where: str,
                  key: str) -> list[dict[str, Any]]:
    """The settings of every sweep point, each value checked like the case setting it sets: a
    mapping of setting -> values gives every combination, a list of mappings exactly those points."""
    if not sweep:
        return [{}]
    infos = field_infos(CaseSettings)
    unknown = "; expected one of " + ", ".join(["method", *infos])
    if isinstance(sweep, list):
        if not all(isinstance(point, dict) for point in sweep):
            raise ConfigError("a list of sweep points must hold mappings of case settings", source=where, key=key)
        return [_parse_point(point, where, f"{key}[{i}].", unknown) for i, point in enumerate(sweep)]
    names = list(sweep)
    for name in names:
        if name not in infos and name != "method":
            raise ConfigError(f"unknown case setting {name!r}{unknown}", source=where, key=f"{key}.{name}")
        if not isinstance(sweep[name], list) or not sweep[name]:
            raise ConfigError("must be a non-empty list of values", source=where, key=f"{key}.{name}")
    values = {n: [_sweep_value(n, value, where, f"{key}.{n}[{i}]", unknown) for i, value in enumerate(sweep[n])]
              for n in names}
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(values[n] for n in names))]


def _sweep_value(name: str, value: Any, where: str, key: str, unknown: str) -> Any:
    """One value of a swept setting, checked like the case setting; errors name ``key``
    (``sweep.<name>[<i>]``)."""
    try:
        return _parse_point({name: value}, where, "", unknown)[name]
    except ConfigError as exc:
        raise exc.with_key(key) from None


def _check_case(case: BenchCase, where: str) -> None:
    """Combinations no lane can run, named by their key."""
    if case.adapter != "lora" or case.optim != "adamw_torch":
        key = "adapter" if case.adapter != "lora" else "optim"
        if case.implementation not in METHOD_IMPLEMENTATIONS and not case.implementation.startswith(CUSTOM_PREFIX):
            raise ConfigError(f"{key} {getattr(case, key)!r} runs in the {' and '.join(METHOD_IMPLEMENTATIONS)} "
                              f"lanes only, not {case.implementation!r}", source=where, key=key)
    if case.adapter != "lora" and case.method == "full":
        raise ConfigError(f"adapter {case.adapter!r} needs method lora or qlora, not full (set method in the "
                          "same sweep point)", source=where, key="adapter")
    if case.adapter == "pissa" and case.method == "qlora":
        raise ConfigError("adapter 'pissa' needs the full-precision base (method lora), as npu-ft train's "
                          "pissa_init", source=where, key="adapter")


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
    base = _apply(base, {k: base[k] for k in ("checkpoint_policy", "gradient_checkpointing") if k in data})
    variants = []
    for i, var in enumerate(top.variants or [{}]):
        changed = _parse_point(var, where, f"variants[{i}].",
                               "; expected one of " + ", ".join(["method", *field_infos(CaseSettings)]))
        variants.append(_apply(base, changed))
    sweeps = {None: _sweep_points(top.sweep, where, "sweep")}
    for impl, sweep in (top.sweep_per_implementation or {}).items():
        if impl not in top.implementations:
            raise ConfigError(f"{impl!r} is not one of the suite's implementations ({', '.join(top.implementations)})",
                              source=where, key=f"sweep_per_implementation.{impl}")
        sweeps[impl] = _sweep_points(sweep, where, f"sweep_per_implementation.{impl}")

    tolerances = copy.deepcopy(DEFAULT_TOLERANCES)
    for method, tol in (top.tolerances or {}).items():
        for dt in DTYPES:
            tolerances[dt][method] = float(tol)
    cross = dict(DEFAULT_CROSS_DEVICE_TOLERANCES)
    if top.cross_device_tolerance is not None:
        cross = {dt: float(top.cross_device_tolerance) for dt in DTYPES}

    name = str(top.name or (Path(path).stem if path else "suite"))
    cases: list[BenchCase] = []
    seen: set[str] = set()
    for vi, settings in enumerate(variants):
        for model, method, device, impl in itertools.product(top.models, top.methods, top.devices,
                                                             top.implementations):
            for si, point in enumerate(sweeps.get(impl, sweeps[None])):
                case_settings = _apply(settings, point)
                case_method = case_settings.pop("method", method)
                policy = _case_policy(case_settings["checkpoint_policy"], case_method, impl)
                if policy == "off" or not case_settings["gradient_checkpointing"]:
                    case_settings.update(gradient_checkpointing=False, checkpoint_policy="full")
                else:
                    case_settings["checkpoint_policy"] = policy
                case_settings["fused_kernels"] = _case_fused_kernels(case_settings["fused_kernels"], impl)
                number = vi if len(sweeps[None]) == 1 and impl not in sweeps else f"{vi}.{si}"
                case = BenchCase(suite=name, model=model, method=case_method, implementation=impl, device=device,
                                 variant=number, **case_settings)  # type: ignore[arg-type]
                _check_case(case, where)
                identity = json.dumps({k: v for k, v in case.to_dict().items() if k not in ("variant", "case_id")},
                                      sort_keys=True)
                if identity not in seen:  # e.g. selective -> full on the reference: already there
                    seen.add(identity)
                    cases.append(case)
    return Suite(name=name, description=str(top.description), path=path, cases=cases, repeats=top.repeats,
                 tolerances=tolerances, cross_device_tolerance=cross, memory_probe=bool(top.memory_probe))


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
