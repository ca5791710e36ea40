"""The schema mechanism shared by every npu-ft config file (training recipes, export recipes, bench
suites): dataclass fields carry their documentation and rules, and one parser turns a raw YAML
mapping into typed values, with errors that name the file (or override) and the key.

A field is declared with :func:`config_field`::

    lora_rank: int = config_field(8, "LoRA rank r.", minimum=1)
    finetuning_type: Literal["lora", "full"] = config_field("lora", "...", unsupported_values={"oft": "..."})

Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]`` (the choices),
``list[X]`` (a YAML list, or for strings a comma-separated string), ``dict[K, V]``, a nested config
dataclass, ``X | None``, unions (tried in order) and ``Any``. Values are coerced as LLaMA-Factory
reads them: ``"1e-4"`` is a number, ``"true"``/``"off"`` are booleans, ``2.0`` is an int.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

__all__ = [
    "NOT_YET",
    "ConfigError",
    "UnsupportedError",
    "FieldInfo",
    "LF_STATUSES",
    "check_value",
    "coerce_field",
    "config_field",
    "field_infos",
    "not_yet",
    "parse_fields",
    "unknown_key_message",
    "values_equal",
]

#: a key's standing with respect to LLaMA-Factory 0.9.5: supported (npu-ft honours it), ignored
#: (accepted, no effect on SFT here), unsupported (accepted only at LLaMA-Factory's default).
#: npu-ft's own keys (not in LLaMA-Factory) are "supported" with ``own=True``.
LF_STATUSES = ("supported", "ignored", "unsupported")

_META_KEY = "npu_ft"


class ConfigError(ValueError):
    """A recipe problem: names the file (or override), the key, and what is wrong."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.message = message
        self.source = source
        self.key = key
        where = []
        if source:
            where.append(source)
        if key:
            where.append(f"key '{key}'")
        if not where:
            text = message
        elif key and message.startswith("must "):  # "key 'x' must be >= 1, got 0" reads as a sentence
            text = f"{': '.join(where)} {message}"
        else:
            text = f"{': '.join(where)}: {message}"
        super().__init__(text)

    def with_key(self, key: str) -> ConfigError:
        """The same error, naming ``key`` instead (e.g. where the value sits in a longer path)."""
        return type(self)(self.message, source=self.source, key=key)


class UnsupportedError(ConfigError, NotImplementedError):
    """A key or value LLaMA-Factory has that npu-ft does not implement yet."""


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """What a config key is: its documentation and rules (read from the dataclass field)."""

    name: str
    annotation: Any
    default: Any
    doc: str
    group: str
    status: str = "supported"
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    #: values valid in LLaMA-Factory but not implemented here -> the reason given to the user
    unsupported_values: Mapping[Any, str] | None = None
    #: None: the key may be null iff its default is None
    nullable: bool | None = None
    #: hand-written (True) or generated from transformers.TrainingArguments (False)
    curated: bool = True
    #: an npu-ft key that LLaMA-Factory does not have
    own: bool = False
    #: maps the raw value before type coercion (e.g. dtype aliases "bf16" -> "bfloat16")
    normalize: Callable[[Any], Any] | None = None
    #: ``check(value, where, key) -> value``: a key with its own validation (replaces the type coercion)
    check: Callable[[Any, str | None, str], Any] | None = None

    @property
    def allows_none(self) -> bool:
        return self.default is None if self.nullable is None else self.nullable

    @property
    def lf(self) -> bool:
        """True for LLaMA-Factory's keys, False for npu-ft's own."""
        return not self.own

    @property
    def choices(self) -> tuple | None:
        """The allowed values of a ``Literal`` annotation (``X | None`` unwrapped), else None."""
        return _literal_choices(self.annotation)

    @property
    def type(self) -> str:
        """Short type name for docs: bool, int, float, str, list, str_or_dict, any, ..."""
        return _type_name(self.annotation)

    def range_text(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append(" / ".join(str(c) for c in self.choices))
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.exclusive_maximum else '<='} {self.maximum:g}")
        return ", ".join(parts)


def config_field(default: Any = dataclasses.MISSING, doc: str = "", *, default_factory: Callable[[], Any] | None = None,
                 status: str = "supported", minimum: float | None = None, maximum: float | None = None,
                 exclusive_minimum: bool = False, exclusive_maximum: bool = False,
                 unsupported_values: Mapping[Any, str] | None = None, nullable: bool | None = None,
                 curated: bool = True, own: bool = False, group: str | None = None,
                 normalize: Callable[[Any], Any] | None = None,
                 check: Callable[[Any, str | None, str], Any] | None = None) -> Any:
    """A dataclass field of a config group, with its documentation and rules in the metadata.

    ``group`` defaults to the dataclass's ``GROUP`` attribute (model, method, data, ...).
    """
    if status not in LF_STATUSES:
        raise ValueError(f"status must be one of {LF_STATUSES}, got {status!r}")
    meta = {"doc": doc, "status": status, "minimum": minimum, "maximum": maximum,
            "exclusive_minimum": exclusive_minimum, "exclusive_maximum": exclusive_maximum,
            "unsupported_values": unsupported_values, "nullable": nullable, "curated": curated, "own": own,
            "group": group, "normalize": normalize, "check": check}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={_META_KEY: meta})
    return dataclasses.field(default=default, metadata={_META_KEY: meta})


# ---------------------------------------------------------------------------------------------
# reading the schema of a dataclass
# ---------------------------------------------------------------------------------------------
_INFO_CACHE: dict[type, dict[str, FieldInfo]] = {}


def field_infos(cls: type) -> dict[str, FieldInfo]:
    """``{key: FieldInfo}`` of every :func:`config_field` of dataclass ``cls`` (in field order)."""
    cached = _INFO_CACHE.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    out: dict[str, FieldInfo] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META_KEY)
        if meta is None:
            continue
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        group = meta["group"] or _group_of(cls, f.name)
        out[f.name] = FieldInfo(name=f.name, annotation=hints[f.name], default=default, doc=meta["doc"],
                                group=group, status=meta["status"], minimum=meta["minimum"],
                                maximum=meta["maximum"], exclusive_minimum=meta["exclusive_minimum"],
                                exclusive_maximum=meta["exclusive_maximum"],
                                unsupported_values=meta["unsupported_values"], nullable=meta["nullable"],
                                curated=meta["curated"], own=meta["own"], normalize=meta["normalize"],
                                check=meta["check"])
    _INFO_CACHE[cls] = out
    return out


def _group_of(cls: type, name: str) -> str:
    """The ``GROUP`` of the class in ``cls``'s MRO that declares field ``name``."""
    for klass in cls.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return getattr(klass, "GROUP", "other")
    return "other"


# ---------------------------------------------------------------------------------------------
# coercion of raw YAML values to the annotated types
# ---------------------------------------------------------------------------------------------
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE_TYPE = type(None)


class _Mismatch(Exception):
    """The raw value does not fit the annotation; ``expected`` says what would."""

    def __init__(self, expected: str, key_suffix: str = "", message: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.key_suffix = key_suffix
        self.message = message


def _args(tp: Any) -> tuple:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _literal_choices(tp: Any) -> tuple | None:
    if _is_union(tp):
        members = [a for a in _args(tp) if a is not _NONE_TYPE]
        return _literal_choices(members[0]) if len(members) == 1 else None
    if typing.get_origin(tp) is Literal:
        return _args(tp)
    return None


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    if _is_union(tp):
        members = [a for a in _args(tp) if a is not _NONE_TYPE]
        names = [_type_name(a) for a in members]
        if names == ["str", "dict"]:
            return "str_or_dict"
        return names[0] if len(names) == 1 else " or ".join(names)
    origin = typing.get_origin(tp)
    if origin is Literal:
        kinds = {type(c).__name__ for c in _args(tp)}
        return kinds.pop() if len(kinds) == 1 else "any"
    if origin in (list, tuple):
        return "list"
    if origin is dict or tp is dict:
        return "dict"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(tp: Any) -> str:
    """What a value of ``tp`` looks like, for error messages."""
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in _args(tp))
    if origin is list:
        inner = _args(tp)[0] if _args(tp) else Any
        return "a comma-separated string or a list of strings" if inner is str else "a list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in _args(tp) if a is not _NONE_TYPE)
    return "a value"


def _strict_name(tp: Any) -> str:
    """Type names for the strict mode's messages: int, float, bool, str, list, mapping."""
    if _is_union(tp):
        return " or ".join(_strict_name(a) for a in _args(tp) if a is not _NONE_TYPE)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in _args(tp))
    if origin is list:
        return "list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, raw: Any, strict: bool = False) -> Any:
    """``raw`` converted to ``tp``; raises :class:`_Mismatch`.

    ``strict``: no conversions between kinds (``"yes"`` is not a bool, ``"8"`` not an int, a comma
    string not a list), for files written by hand for npu-ft (bench suites).
    """
    if tp is Any:
        return raw
    if strict and not _is_union(tp) and typing.get_origin(tp) is not Literal:
        kind = typing.get_origin(tp) or tp
        ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,), dict: (Mapping,)}.get(
            kind, (Mapping,) if dataclasses.is_dataclass(tp) else None)
        if ok is not None and (not isinstance(raw, ok) or (isinstance(raw, bool) and kind is not bool)):
            raise _Mismatch(_strict_name(tp), message=f"must be {_strict_name(tp)}, got {type(raw).__name__} "
                                                      f"{raw!r}")
    if _is_union(tp):
        members = _args(tp)
        if raw is None and _NONE_TYPE in members:
            return None
        real = [m for m in members if m is not _NONE_TYPE]
        if len(real) == 1:  # X | None: X's own complaint
            return _coerce(real[0], raw, strict)
        for member in real:
            try:
                return _coerce(member, raw, strict)
            except _Mismatch as exc:
                if exc.key_suffix:  # a complaint about something inside the value: keep it
                    raise
        expected = _strict_name(tp) if strict else _describe(tp)
        message = f"must be {expected}, got {type(raw).__name__} {raw!r}" if strict else None
        raise _Mismatch(expected, message=message)
    if raw is None:
        raise _Mismatch(_describe(tp))
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise _Mismatch("true or false")
    if tp is int:
        if isinstance(raw, bool):
            raise _Mismatch("an integer")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str) and re.fullmatch(r"\s*[-+]?\d+\s*", raw):
            return int(raw)
        raise _Mismatch("an integer")
    if tp is float:
        if isinstance(raw, bool):
            raise _Mismatch("a number")
        if isinstance(raw, (int, float)):
            value = raw
        elif isinstance(raw, str):
            try:
                value = float(raw)  # "1e-4" is a string to YAML 1.1, a float to LLaMA-Factory
            except ValueError:
                raise _Mismatch("a number") from None
        else:
            raise _Mismatch("a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise _Mismatch("a number", message=f"must be a finite number, got {raw!r}")
        return value
    if tp is str:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise _Mismatch("a string")
        return raw if isinstance(raw, str) else str(raw)
    if origin is Literal:
        return _coerce_choice(tp, raw)
    if origin is list:
        return _coerce_list(tp, raw, strict)
    if origin is dict or tp is dict:
        return _coerce_dict(tp, raw, strict)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(raw, Mapping):
            raise _Mismatch("a mapping")
        try:
            return tp(**parse_fields(tp, raw, source=None, strict=strict))
        except ConfigError as exc:
            raise _Mismatch("a mapping", f".{exc.key}" if exc.key else "", _strip_where(exc)) from None
    if isinstance(tp, type):
        if isinstance(raw, tp):
            return raw
        raise _Mismatch(_describe(tp))
    return raw


def _coerce_choice(tp: Any, raw: Any) -> Any:
    choices = _args(tp)
    for choice in choices:
        if raw == choice and type(raw) is type(choice):
            return choice
        if isinstance(choice, str) and isinstance(raw, str) and raw.strip() == choice:
            return choice
        if isinstance(choice, int) and not isinstance(choice, bool):
            try:
                if _coerce(int, raw) == choice:
                    return choice
            except _Mismatch:
                pass
    raise _Mismatch(_describe(tp), message="must be one of " + ", ".join(repr(c) for c in choices) + f", got {raw!r}")


def _coerce_list(tp: Any, raw: Any, strict: bool) -> list:
    inner = _args(tp)[0] if _args(tp) else Any
    if isinstance(raw, str) and inner is str and not strict:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if not isinstance(raw, (list, tuple)):
        raise _Mismatch(_describe(tp))
    items = []
    for i, item in enumerate(raw):
        try:
            value = _coerce(inner, item, strict)
        except _Mismatch as exc:
            raise _Mismatch(exc.expected, f"[{i}]{exc.key_suffix}",
                            exc.message or f"expected {exc.expected}, got {item!r}") from None
        items.append(value.strip() if isinstance(value, str) else value)
    return items


def _coerce_dict(tp: Any, raw: Any, strict: bool) -> dict:
    if not isinstance(raw, Mapping):
        raise _Mismatch("a mapping")
    key_tp, value_tp = _args(tp) if _args(tp) else (Any, Any)
    out = {}
    for k, v in raw.items():
        try:
            ck = _coerce(key_tp, k, strict)
        except _Mismatch as exc:
            raise _Mismatch(exc.expected, f".{k}", f"unknown key; expected {exc.expected}") from None
        try:
            out[ck] = _coerce(value_tp, v, strict)
        except _Mismatch as exc:
            raise _Mismatch(exc.expected, f".{k}{exc.key_suffix}",
                            exc.message or f"expected {exc.expected}, got {v!r}") from None
    return out


def _strip_where(exc: ConfigError) -> str:
    """The message of ``exc`` without its ``source: key 'x': `` prefix."""
    text = str(exc)
    prefix = ": ".join(p for p in (exc.source, f"key '{exc.key}'" if exc.key else None) if p)
    for sep in (": ", " "):
        if prefix and text.startswith(prefix + sep):
            return text[len(prefix) + len(sep):]
    return text


def values_equal(a: Any, b: Any) -> bool:
    """Equal as config values (a list equals its comma string; booleans never equal numbers)."""
    if isinstance(a, list) and isinstance(b, str):
        return [x.strip() for x in b.split(",")] == a
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def check_value(info: FieldInfo, value: Any, raw: Any, source: str | None) -> None:
    """Range and unsupported-value rules of ``info`` for an already coerced ``value``."""
    if value is None:
        return
    if info.unsupported_values:
        for bad, why in info.unsupported_values.items():
            if values_equal(value, bad):
                raise UnsupportedError(why, source=source, key=info.name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = info.minimum, info.maximum
        if lo is not None and (value < lo or (info.exclusive_minimum and value == lo)):
            raise ConfigError(f"must be {'>' if info.exclusive_minimum else '>='} {lo:g}, got {raw!r}",
                              source=source, key=info.name)
        if hi is not None and (value > hi or (info.exclusive_maximum and value == hi)):
            raise ConfigError(f"must be {'<' if info.exclusive_maximum else '<='} {hi:g}, got {raw!r}",
                              source=source, key=info.name)


def coerce_field(info: FieldInfo, raw: Any, source: str | None, strict: bool = False, prefix: str = "") -> Any:
    """One key's raw YAML value -> its typed, checked value (or a :class:`ConfigError`).

    ``prefix`` is put before the key's name in messages (``variants[0].`` for a nested mapping).
    """
    key = prefix + info.name
    if info.normalize is not None and raw is not None:
        raw = info.normalize(raw)
    if info.check is not None:
        return info.check(raw, source, key)
    if raw is None:
        if info.allows_none or info.status != "supported" or info.annotation is Any:
            return None
        raise ConfigError("must be set (got null)", source=source, key=key)
    if info.unsupported_values:  # checked first: LLaMA-Factory's values that npu-ft refuses by name
        for bad, why in info.unsupported_values.items():
            if values_equal(raw, bad) or (isinstance(raw, str) and isinstance(bad, str) and raw.strip() == bad):
                raise UnsupportedError(why, source=source, key=key)
    try:
        value = _coerce(info.annotation, raw, strict)
    except _Mismatch as exc:
        message = exc.message or f"expected {exc.expected}, got {raw!r} ({type(raw).__name__})"
        raise ConfigError(message, source=source, key=key + exc.key_suffix) from None
    if isinstance(value, list) and not value and typing.get_origin(_non_none(info.annotation)) is list:
        raise ConfigError("must not be empty", source=source, key=key)
    try:
        check_value(info, value, raw, source)
    except ConfigError as exc:
        if prefix:
            raise type(exc)(_strip_where(exc), source=source, key=key) from None
        raise
    return value


def _non_none(tp: Any) -> Any:
    if _is_union(tp):
        members = [a for a in _args(tp) if a is not _NONE_TYPE]
        if len(members) == 1:
            return members[0]
    return tp


def unknown_key_message(key: str, known: Iterable[str], what: str = "key") -> str:
    """``unknown key 'x'; did you mean 'y'?`` (the closest known key, when one is close)."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} '{key}'{hint}"


def parse_fields(cls: type, raw: Mapping[str, Any], source: str | None,
                 sources: Mapping[str, str] | None = None, unknown: str | None = None, strict: bool = False,
                 prefix: str = "") -> dict[str, Any]:
    """Coerce and check the keys of ``raw`` against dataclass ``cls``; returns ``{field: value}``.

    Keys ``raw`` does not set are left out (the dataclass defaults apply). ``sources`` maps a key to
    where it was set (a file, an override), else ``source``. ``unknown``: the text after
    "unknown key 'x'" for keys ``cls`` does not have (default: the list of known keys). ``strict``:
    see :func:`_coerce`. ``prefix``: put before key names in messages.
    """
    infos = field_infos(cls)
    sources = sources or {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        where = sources.get(key, source)
        info = infos.get(key) if isinstance(key, str) else None
        if info is None:
            tail = unknown if unknown is not None else "; expected one of " + ", ".join(infos)
            raise ConfigError(unknown_key_message(str(key), infos) + tail, source=where, key=prefix + str(key))
        out[key] = coerce_field(info, value, where, strict=strict, prefix=prefix)
    return out


NOT_YET = "not supported by npu-ft yet"


def not_yet(key: str, *values: Any) -> dict[Any, str]:
    """``{value: "<key> '<value>' is not supported by npu-ft yet"}`` for LLaMA-Factory values npu-ft lacks."""
    return {value: f"{key} {value!r} is {NOT_YET}" for value in values}
