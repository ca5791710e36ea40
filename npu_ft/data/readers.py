"""Read the records of a local dataset (json / jsonl file or a folder of them).

Errors name the file and, for malformed JSON, the line (and column) where parsing failed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .constants import FILEEXT2TYPE

__all__ = ["DataFileError", "list_data_files", "read_json_records", "read_records", "select_samples"]

Record = dict[str, Any]


class DataFileError(ValueError):
    """A data file is missing, unreadable, malformed or empty."""


def list_data_files(dataset_dir: str | os.PathLike, file_name: str) -> list[str]:
    """The data files of one dataset entry: the file itself, or the files of a folder (sorted)."""
    path = os.path.join(os.fspath(dataset_dir), file_name)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise DataFileError(f"Data folder {path} has no files.")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataFileError(
            f"Data file {path} not found (file_name={file_name!r}, dataset_dir={os.fspath(dataset_dir)!r})."
        )
    kinds = {FILEEXT2TYPE.get(os.path.splitext(f)[1][1:].lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if FILEEXT2TYPE.get(os.path.splitext(f)[1][1:].lower()) is None)
        raise DataFileError(f"{bad}: unsupported file type; allowed: {', '.join(FILEEXT2TYPE)}.")
    if len(kinds) > 1:
        raise DataFileError(f"{path}: file types should be identical, found {sorted(kinds)}.")
    if kinds != {"json"}:
        raise DataFileError(
            f"{files[0]}: {kinds.pop()} files are not supported by npu-ft yet; convert the data to json or jsonl."
        )
    return files


def _check_record(obj: Any, path: str, lineno: int | None, index: int) -> Record:
    if not isinstance(obj, dict):
        where = f"{path}:{lineno}" if lineno is not None else f"{path} (item {index})"
        raise DataFileError(f"{where}: each example must be a JSON object, got {type(obj).__name__}.")
    return obj


def _read_json_lines(text: str, path: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}:{lineno}:{err.colno}: malformed JSON line: {err.msg}") from err
        records.append(_check_record(obj, path, lineno, len(records)))
    return records


def read_json_records(path: str) -> list[Record]:
    """Records of one ``.json`` (a JSON array, or JSON lines) or ``.jsonl`` (JSON lines) file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as err:
        raise DataFileError(f"Data file {path} not found.") from err
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path}: not UTF-8 text ({err}).") from err
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise DataFileError(f"{path} is empty: no examples.")
    if path.lower().endswith(".jsonl") or not text.lstrip().startswith("["):
        if not path.lower().endswith(".jsonl"):
            # A .json file may hold one JSON value or JSON lines (as the `datasets` json loader accepts).
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                return _read_json_lines(text, path)
            if isinstance(obj, dict):
                return [obj]
            raise DataFileError(f"{path}: expected a JSON array of objects or JSON lines, got {type(obj).__name__}.")
        return _read_json_lines(text, path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from err
    if not isinstance(obj, list):  # pragma: no cover - text starts with "["
        raise DataFileError(f"{path}: expected a JSON array of objects.")
    return [_check_record(o, path, None, i) for i, o in enumerate(obj)]


def read_records(files: list[str]) -> list[Record]:
    """All records of the given files, in order. Raises if there are none."""
    records: list[Record] = []
    for path in files:
        records.extend(read_json_records(path))
    if not records:
        raise DataFileError(f"{', '.join(files)}: no examples found.")
    return records


def select_samples(
    records: list[Record], num_samples: int | None = None, max_samples: int | None = None, seed: int = 42
) -> list[Record]:
    """Apply dataset_info ``num_samples`` (sample with every record used before any repeats) then
    ``max_samples`` (keep the first N), in LLaMA-Factory's order."""
    if num_samples is not None:
        rng = np.random.default_rng(seed)
        n = len(records)
        picks = list(rng.permutation(n)[:num_samples])
        if num_samples > n:
            picks += list(rng.choice(n, num_samples - n))
        records = [records[int(i)] for i in picks]
    if max_samples is not None:
        records = records[: min(int(max_samples), len(records))]
    return records
