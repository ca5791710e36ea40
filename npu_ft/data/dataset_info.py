"""Parse ``dataset_info.json`` (LLaMA-Factory's dataset registry) into :class:`DatasetAttr`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .constants import DATA_CONFIG

__all__ = ["DatasetAttr", "DatasetInfoError", "get_dataset_attrs", "load_dataset_info"]

_COLUMN_KEYS = (
    "prompt", "query", "response", "history", "messages", "system", "tools",
    "images", "videos", "audios", "chosen", "rejected", "kto_tag",
)  # fmt: skip
_TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
FORMATTINGS = ("alpaca", "sharegpt", "openai")


class DatasetInfoError(ValueError):
    """A dataset_info.json problem (missing file, unknown dataset, unsupported source)."""


@dataclass
class DatasetAttr:
    """One dataset entry. Defaults are LLaMA-Factory's; see :meth:`from_entry` for the column rule."""

    name: str
    file_name: str
    formatting: str = "alpaca"
    ranking: bool = False
    split: str = "train"
    num_samples: int | None = None
    # columns (alpaca: prompt/query/response/history/system; sharegpt: messages/system/tools)
    system: str | None = None
    tools: str | None = None
    images: str | None = None
    videos: str | None = None
    audios: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    kto_tag: str | None = None
    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    messages: str | None = "conversations"
    # sharegpt tags
    role_tag: str | None = "from"
    content_tag: str | None = "value"
    user_tag: str | None = "human"
    assistant_tag: str | None = "gpt"
    observation_tag: str | None = "observation"
    function_tag: str | None = "function_call"
    system_tag: str | None = "system"

    @classmethod
    def from_entry(cls, name: str, entry: dict[str, Any], info_path: str = DATA_CONFIG) -> DatasetAttr:
        """Build from one dataset_info.json entry.

        As in LLaMA-Factory: when an entry has a ``columns`` object, *every* column key is taken from
        it (a column it does not name becomes None, not the default); likewise for ``tags``.
        """
        if not isinstance(entry, dict):
            raise DatasetInfoError(f"{info_path}: entry {name!r} must be a JSON object, got {type(entry).__name__}")
        hub = [key for key in _HUB_KEYS if key in entry]
        if hub:
            raise DatasetInfoError(
                f"{info_path}: dataset {name!r} is loaded from {hub[0]!r} ({entry[hub[0]]!r}); hub, script and cloud "
                "sources are not supported offline by npu-ft. Download the data and point 'file_name' at a local "
                "json/jsonl file or folder instead."
            )
        if "file_name" not in entry:
            raise DatasetInfoError(f"{info_path}: dataset {name!r} has no 'file_name'")
        attr = cls(name=name, file_name=str(entry["file_name"]))
        attr.formatting = entry.get("formatting", "alpaca")
        if attr.formatting not in FORMATTINGS:
            raise DatasetInfoError(
                f"{info_path}: dataset {name!r} has formatting {attr.formatting!r}; expected one of {FORMATTINGS}"
            )
        attr.ranking = bool(entry.get("ranking", False))
        attr.split = entry.get("split", "train")
        attr.num_samples = entry.get("num_samples")
        if "subset" in entry or "folder" in entry:
            raise DatasetInfoError(f"{info_path}: dataset {name!r}: 'subset'/'folder' only apply to hub datasets")
        for group, keys in (("columns", _COLUMN_KEYS), ("tags", _TAG_KEYS)):
            if group in entry:
                values = entry[group]
                if not isinstance(values, dict):
                    raise DatasetInfoError(f"{info_path}: dataset {name!r}: {group!r} must be a JSON object")
                unknown = sorted(set(values) - set(keys))
                if unknown:
                    raise DatasetInfoError(
                        f"{info_path}: dataset {name!r}: unknown {group} key(s) {unknown}; known: {list(keys)}"
                    )
                for key in keys:
                    setattr(attr, key, values.get(key))
        return attr

    def column_of(self, field_name: str) -> str:
        """Human description for errors: 'columns.prompt' -> 'instruction'."""
        return f"{getattr(self, field_name)!r} (dataset_info.json columns.{field_name} of {self.name!r})"


def load_dataset_info(dataset_dir: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Read ``<dataset_dir>/dataset_info.json``; returns (mapping, its path)."""
    path = os.path.join(os.fspath(dataset_dir), DATA_CONFIG)
    if not os.path.isfile(path):
        raise DatasetInfoError(f"Cannot find {path} (dataset_dir={os.fspath(dataset_dir)!r}).")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except json.JSONDecodeError as err:
        raise DatasetInfoError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from err
    if not isinstance(info, dict):
        raise DatasetInfoError(f"{path}: expected a JSON object mapping dataset names to entries")
    return info, path


def get_dataset_attrs(names: list[str] | str | None, dataset_dir: str | os.PathLike) -> list[DatasetAttr]:
    """The :class:`DatasetAttr` of each requested dataset name, in order."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    info, path = load_dataset_info(dataset_dir)
    attrs = []
    for name in names:
        if name not in info:
            known = ", ".join(sorted(info)) or "(none)"
            raise DatasetInfoError(f"Undefined dataset {name!r} in {path}. Known datasets: {known}.")
        attrs.append(DatasetAttr.from_entry(name, info[name], path))
    return attrs
