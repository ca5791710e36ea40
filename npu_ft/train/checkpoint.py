"""Checkpoints: atomic writes, finding the latest one, resolving ``resume_from_checkpoint``, and
checking that a checkpoint can be resumed by this run (its files, its method, its step).

A checkpoint ``checkpoint-N`` is first written completely into ``tmp-checkpoint-N`` next to it and
then renamed with :func:`os.replace` (atomic on POSIX within one file system). A run killed while
saving leaves at most a ``tmp-checkpoint-N`` folder, which is never picked for resuming and is
removed by the next run; any ``checkpoint-N`` that exists is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from .run_identity import CheckpointError, read_run_file

PREFIX = "checkpoint"
TMP_PREFIX = "tmp-checkpoint"
_CKPT_RE = re.compile(rf"^{PREFIX}-(\d+)$")
_TMP_RE = re.compile(rf"^{TMP_PREFIX}-(\d+)$")

__all__ = [
    "CheckpointError",
    "atomic_publish",
    "check_resumable",
    "checkpoint_dirs",
    "checkpoint_method",
    "checkpoint_step",
    "latest_checkpoint",
    "parse_resume",
    "remove_stale_tmp",
    "resolve_resume",
    "tmp_checkpoint_dir",
]


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete ``checkpoint-N`` folders of ``output_dir``, by increasing N."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CKPT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-N`` with the largest N (temp folders are never returned)."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def tmp_checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{TMP_PREFIX}-{step}")


def remove_stale_tmp(output_dir: str) -> list[str]:
    """Delete ``tmp-checkpoint-*`` folders left by a run that died while saving."""
    removed = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if _TMP_RE.match(name):
                path = os.path.join(output_dir, name)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_publish(tmp_dir: str, final_dir: str) -> None:
    """Move the finished ``tmp_dir`` to ``final_dir`` in one rename.

    Files are fsync'ed first so the rename never exposes a folder whose contents are still in the
    page cache only. An existing ``final_dir`` (a re-save of the same step) is replaced.
    """
    for root, _, files in os.walk(tmp_dir):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
            except OSError:  # pragma: no cover
                pass
    if os.path.isdir(final_dir):
        old = final_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(os.path.dirname(os.path.abspath(final_dir)))


def parse_resume(value) -> bool | str | None:
    """``resume_from_checkpoint`` as None (not asked), True (the latest checkpoint) or a path."""
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in ("", "false", "none", "null"):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
        return True
    return str(value)


def resolve_resume(value, output_dir: str) -> str | None:
    """Turn ``resume_from_checkpoint`` (None/False, True/"true" = latest, or a path) into a folder.

    Raises :class:`CheckpointError` naming the key when the path is missing or no checkpoint exists.
    """
    asked = parse_resume(value)
    if asked is None:
        return None
    if asked is True:
        found = latest_checkpoint(output_dir)
        if found is None:
            raise CheckpointError(
                f"resume_from_checkpoint: true, but output_dir {output_dir!r} has no checkpoint-N folder"
            )
        return found
    path = asked
    if not os.path.isdir(path):
        raise CheckpointError(f"resume_from_checkpoint: {path!r} is not a folder")
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise CheckpointError(f"resume_from_checkpoint: {path!r} has no trainer_state.json (not a checkpoint)")
    return path


_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_FULL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
_METHOD_WORDS = {"lora": "a LoRA adapter", "qlora": "a QLoRA adapter", "vera": "a VeRA adapter",
                 "full": "full fine-tuning weights"}


def _method_from_files(path: str) -> str | None:
    if any(os.path.isfile(os.path.join(path, n)) for n in _ADAPTER_FILES):
        return "lora"
    if any(os.path.isfile(os.path.join(path, n)) for n in _FULL_FILES):
        return "full"
    return None


def checkpoint_method(path: str) -> str | None:
    """``lora`` / ``qlora`` / ``full`` as recorded in the checkpoint's run file, else ``lora`` for
    adapter files and ``full`` for model weights (None: neither)."""

    recorded = read_run_file(path)
    if recorded is not None and recorded.method:
        return recorded.method
    return _method_from_files(path)


def checkpoint_step(path: str) -> int:
    """``global_step`` of the checkpoint's ``trainer_state.json``."""
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        return int(json.load(f).get("global_step", 0))


def check_resumable(path: str, method: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` holds complete, readable files of ``method``
    (``lora`` / ``qlora`` / ``full``) and a readable ``trainer_state.json``. Without a run file
    LoRA and QLoRA adapters cannot be told apart; both fit either."""
    from npu_ft.model.loading import check_safetensors

    recorded = read_run_file(path)
    found = checkpoint_method(path)
    if found is None:
        raise CheckpointError(f"{path} has no weights (neither {_ADAPTER_FILES[1]} nor {_FULL_FILES[0]})")
    fits = found == method if recorded is not None else (found == "full") == (method == "full")
    if not fits:
        raise CheckpointError(
            f"{path} is a {found} checkpoint ({_METHOD_WORDS.get(found, found)}); this run is {method} "
            f"({_METHOD_WORDS.get(method, method)}): a checkpoint of one method cannot be resumed by another")
    try:
        checkpoint_step(path)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: trainer_state.json is unreadable ({exc})") from None
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            problem = check_safetensors(os.path.join(path, name))
            if problem:
                raise CheckpointError(f"{path}: {name} is truncated or corrupt ({problem})")
