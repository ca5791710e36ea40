"""Reading YAML recipes and suites safely: ``yaml.safe_load`` semantics, plus errors that name the
file and line, and a duplicated key rejected (PyYAML silently keeps the last value).

Only ``true``/``false`` are booleans (YAML 1.2, as LLaMA-Factory's OmegaConf reads recipes):
``save_strategy: no`` is the string "no", not ``False`` as YAML 1.1's yes/no/on/off words would make it.

>>> load_yaml_text("a: 1\\nb: 2\\n", "r.yaml")
{'a': 1, 'b': 2}
>>> load_yaml_text("a: 1\\na: 2\\n", "r.yaml")
Traceback (most recent call last):
...
npu_ft.config.yaml_io.YamlError: r.yaml:2: key 'a' is given twice (lines 1 and 2); keep one
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["YamlError", "load_yaml_file", "load_yaml_mapping", "load_yaml_text"]


class YamlError(ValueError):
    """A YAML file that cannot be read: the message starts with ``file[:line]``."""

    def __init__(self, message: str, *, source: str, line: int | None = None) -> None:
        self.source = source
        self.line = line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice."""

    source = "<yaml>"


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the normal constructor report it
            continue
        if first is not None:
            raise YamlError(f"key {key!r} is given twice (lines {first} and {line}); keep one",
                            source=loader.source, line=line)
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_BOOL_TAG = "tag:yaml.org,2002:bool"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))


def load_yaml_text(text: str, source: str = "<yaml>") -> Any:
    """Parse ``text`` like ``yaml.safe_load``; :class:`YamlError` names ``source`` and the line."""
    loader = _UniqueKeyLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise YamlError(f"invalid YAML: {problem}", source=source,
                        line=mark.line + 1 if mark is not None else None) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"invalid YAML: {exc}", source=source) from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | os.PathLike) -> Any:
    """Read and parse a YAML file; a missing, unreadable or invalid file is one :class:`YamlError`."""
    p = Path(path)
    source = str(p)
    if not p.exists():
        raise YamlError("file not found", source=source)
    if p.is_dir():
        raise YamlError("is a directory, expected a YAML file", source=source)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(f"not a UTF-8 text file ({exc.reason} at byte {exc.start})", source=source) from None
    except OSError as exc:
        raise YamlError(f"cannot read: {exc.strerror or exc}", source=source) from None
    return load_yaml_text(text, source)


def load_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file whose top level is a ``key: value`` mapping with string keys (empty file: ``{}``)."""
    data = load_yaml_file(path)
    source = str(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise YamlError(f"expected a mapping of key: value at the top level, got {type(data).__name__}",
                        source=source)
    for key in data:
        if not isinstance(key, str):
            raise YamlError(f"keys must be strings, got {key!r}", source=source)
    return data
