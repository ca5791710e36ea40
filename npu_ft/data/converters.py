"""Convert raw alpaca / sharegpt records into conversation turns (LLaMA-Factory's aligned format).

Every converted example has ``prompt`` (messages up to and including the last user turn),
``response`` (the final assistant message, as a one-element list), ``system`` and ``tools``.
Messages are ``{"role": ..., "content": ...}`` with roles ``user``, ``assistant``,
``observation`` and ``function``. A sharegpt example whose roles do not alternate, or that has an
odd number of messages, comes out with empty ``prompt``/``response`` and a warning, exactly as in
LLaMA-Factory; the supervised processor then drops it (with a second warning).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .dataset_info import DatasetAttr

__all__ = ["ConvertedExample", "DataFormatError", "Role", "convert_records", "check_columns"]

logger = logging.getLogger("npu_ft.data")


class Role:
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    FUNCTION = "function"
    OBSERVATION = "observation"


class DataFormatError(ValueError):
    """A record does not fit the declared dataset format (missing column, bad history, ...)."""


@dataclass
class ConvertedExample:
    prompt: list[dict[str, str]] = field(default_factory=list)
    response: list[dict[str, str]] = field(default_factory=list)
    system: str | None = ""
    tools: str | None = ""

    @property
    def is_valid(self) -> bool:
        """What the supervised processor requires: odd prompt length and exactly one response."""
        return len(self.prompt) % 2 == 1 and len(self.response) == 1


_UNSUPPORTED_COLUMNS = ("images", "videos", "audios", "chosen", "rejected", "kto_tag")
_USED_COLUMNS = {
    "alpaca": ("prompt", "query", "response", "history", "system", "tools"),
    "sharegpt": ("messages", "system", "tools"),
}


def check_columns(records: list[dict[str, Any]], attr: DatasetAttr, source: str) -> None:
    """Raise if the dataset needs a column that no record of ``source`` has (LF would KeyError)."""
    if attr.formatting not in _USED_COLUMNS:
        raise DataFormatError(f"dataset {attr.name!r}: formatting {attr.formatting!r} is not supported by npu-ft yet")
    if attr.ranking:
        raise DataFormatError(f"dataset {attr.name!r} is a ranking (preference) dataset; npu-ft trains SFT only")
    for col in _UNSUPPORTED_COLUMNS:
        if getattr(attr, col):
            raise DataFormatError(
                f"dataset {attr.name!r}: column {col!r} ({getattr(attr, col)!r}) is not supported by npu-ft "
                "(multimodal and preference data are out of scope)"
            )
    if not records:
        return
    present: set[str] = set()
    for rec in records:
        present.update(rec.keys())
    for col in _USED_COLUMNS[attr.formatting]:
        name = getattr(attr, col)
        if name and name not in present:
            raise DataFormatError(
                f"{source}: column {name!r} (dataset_info.json columns.{col} of dataset {attr.name!r}) "
                f"not found; the records have columns {sorted(present)}"
            )


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(record: dict[str, Any], column: str | None, where: str) -> Any:
    """The value of a text column: a string or absent/null; anything else is a :class:`DataFormatError`."""
    if not column:
        return None
    value = record.get(column)
    if value is not None and not isinstance(value, str):
        raise DataFormatError(f"{where}, column {column!r}: expected a string, got {type(value).__name__} "
                              f"{_short(value)}")
    return value


def _tools_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def convert_alpaca(record: dict[str, Any], attr: DatasetAttr, where: str = "") -> ConvertedExample:
    prompt: list[dict[str, str]] = []
    history = record.get(attr.history) if attr.history else None
    if isinstance(history, list):
        for turn_idx, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
                raise DataFormatError(
                    f"{where}, column {attr.history!r}: history[{turn_idx}] must be a [prompt, response] pair of "
                    f"strings, got {_short(pair)}"
                )
            prompt.append({"role": Role.USER, "content": pair[0]})
            prompt.append({"role": Role.ASSISTANT, "content": pair[1]})
    parts = [text for text in (_text(record, attr.prompt, where), _text(record, attr.query, where)) if text]
    prompt.append({"role": Role.USER, "content": "\n".join(parts)})
    response_value = _text(record, attr.response, where)
    response = [{"role": Role.ASSISTANT, "content": response_value}] if response_value is not None else []
    return ConvertedExample(
        prompt=prompt,
        response=response,
        system=_text(record, attr.system, where) if attr.system else "",
        tools=_tools_text(record.get(attr.tools)) if attr.tools else "",
    )


def convert_sharegpt(record: dict[str, Any], attr: DatasetAttr, where: str = "") -> ConvertedExample:
    tag_to_role = {
        attr.user_tag: Role.USER,
        attr.assistant_tag: Role.ASSISTANT,
        attr.observation_tag: Role.OBSERVATION,
        attr.function_tag: Role.FUNCTION,
        attr.system_tag: Role.SYSTEM,
    }
    allowed = ((attr.user_tag, attr.observation_tag), (attr.assistant_tag, attr.function_tag))
    messages = record.get(attr.messages)
    if messages is None:
        messages = []
    if not isinstance(messages, list) or any(not isinstance(m, dict) for m in messages):
        raise DataFormatError(f"{where}: column {attr.messages!r} must be a list of message objects")

    for turn_idx, message in enumerate(messages):
        _text(message, attr.content_tag, f"{where}, column {attr.messages!r} message {turn_idx}")
    if attr.system_tag and messages and messages[0].get(attr.role_tag) == attr.system_tag:
        system = messages[0].get(attr.content_tag)
        messages = messages[1:]
    else:
        system = _text(record, attr.system, where) if attr.system else ""

    aligned = []
    broken = False
    for turn_idx, message in enumerate(messages):
        tag = message.get(attr.role_tag)
        if tag not in allowed[turn_idx % 2]:
            logger.warning("%s: invalid role tag %r at message %d in %s.", where, tag, turn_idx, messages)
            broken = True
            break
        aligned.append({"role": tag_to_role[tag], "content": message.get(attr.content_tag)})
    if not broken and len(aligned) % 2 != 0:
        logger.warning("%s: invalid message count (%d, must be even) in %s.", where, len(aligned), messages)
        broken = True
    tools = _tools_text(record.get(attr.tools)) if attr.tools else ""
    if broken:
        logger.warning("%s: skipping this abnormal example.", where)
        return ConvertedExample(prompt=[], response=[], system=system, tools=tools)
    return ConvertedExample(prompt=aligned[:-1], response=aligned[-1:], system=system, tools=tools)


def convert_records(records: list[dict[str, Any]], attr: DatasetAttr, source: str = "",
                    rows: list[int] | None = None) -> list[ConvertedExample]:
    """Convert every record of one dataset (``source`` names the file(s) in messages; ``rows``:
    each record's 0-based position in the file(s), when sampling reordered them)."""
    check_columns(records, attr, source or attr.file_name)
    convert = convert_alpaca if attr.formatting == "alpaca" else convert_sharegpt
    rows = rows if rows is not None else list(range(len(records)))
    return [convert(rec, attr, f"{source or attr.file_name} (example {row}, row {row + 1})")
            for rec, row in zip(records, rows, strict=True)]
