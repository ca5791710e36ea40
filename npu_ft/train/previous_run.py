"""Setting an earlier run's files aside before a fresh run writes into the same ``output_dir``.

A run that starts from step 0 (``overwrite_output_dir: true``, or leftovers of a run that never
saved a checkpoint) first clears the run files of the earlier run, so no later automatic resume
can pick an earlier run's ``checkpoint-N`` and no log mixes two runs:

* an entry npu-ft wrote -- listed, with the same size and mtime, in the ``npu_ft_run.json`` of
  ``output_dir`` or of the ``checkpoint-N`` it belongs to -- is deleted;
* any other entry with a run-file name (:func:`is_run_file`: ``checkpoint-N``, weights, adapter,
  tokenizer and config files, logs, results; e.g. written by LLaMA-Factory, an older npu-ft, or
  changed since) is moved, not deleted, into ``output_dir/previous-run-<date>-<time>/``;
* everything else in ``output_dir`` (the user's own files, earlier ``previous-run-*`` folders) and
  the folders in ``keep`` (the model folder, the data) stay where they are.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .run_identity import RUN_FILE, read_run_file

logger = logging.getLogger(__name__)

__all__ = ["SetAside", "is_run_file", "set_aside_previous_run"]

_RUN_NAMES = frozenset({
    RUN_FILE, RUN_FILE + ".tmp", "trainer_log.jsonl", "trainer_log.jsonl.tmp", "trainer_state.json",
    "train_results.json", "eval_results.json", "all_results.json", "predict_results.json", "training_args.json",
    "training_args.bin",
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
    "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "config.json",
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    ".tmp-final-model", "README.md", "running_log.txt", "generated_predictions.jsonl",
    "generated_predictions.jsonl.tmp",
})
_RUN_PATTERNS = re.compile(
    r"^(?:(?:tmp-)?checkpoint-\d+|model-\d+-of-\d+\.safetensors|pytorch_model-\d+-of-\d+\.bin|training_[\w.-]+\.png"
    r"|\.(?:adapter_model\.safetensors|adapter_config\.json)\.tmp-\w+)$")


def is_run_file(name: str) -> bool:
    """Whether an entry of output_dir is named like something a training run writes there."""
    return name in _RUN_NAMES or bool(_RUN_PATTERNS.match(name))


@dataclass
class SetAside:
    """What :func:`set_aside_previous_run` did."""

    deleted: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    moved_to: str | None = None


def _written_by_npu_ft(path: str, record: list[int] | None) -> bool:
    if record is None or os.path.islink(path) or not os.path.isfile(path):
        return False
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns] == list(record)


def _delete_written(folder: str) -> bool:
    """Delete the files npu-ft wrote into a checkpoint folder; True when the folder is gone."""
    identity = read_run_file(folder)
    if identity is None:
        return False
    for rel, record in identity.files.items():
        path = os.path.join(folder, rel)
        if _written_by_npu_ft(path, record):
            os.unlink(path)
    os.unlink(os.path.join(folder, RUN_FILE))
    for root, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(root)  # only empty folders
        except OSError:
            pass
    return not os.path.exists(folder)


def _inside(path: str, folders: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    return any(f == real or f.startswith(real + os.sep) for f in folders)


def set_aside_previous_run(output_dir: str, keep: Iterable[str] = ()) -> SetAside:
    """Clear the earlier run's files from ``output_dir`` (see the module docstring)."""
    done = SetAside()
    if not os.path.isdir(output_dir):
        return done
    keep_real = [os.path.realpath(k) for k in keep if k]
    top = read_run_file(output_dir)
    written = top.files if top is not None else {}
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name == RUN_FILE or not is_run_file(name) or _inside(path, keep_real):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            if _delete_written(path):
                done.deleted.append(name)
                continue
        elif _written_by_npu_ft(path, written.get(name)):
            os.unlink(path)
            done.deleted.append(name)
            continue
        if done.moved_to is None:
            done.moved_to = _aside_folder(output_dir)
        os.replace(path, os.path.join(done.moved_to, name))
        done.moved.append(name)
    run_file = os.path.join(output_dir, RUN_FILE)
    if os.path.isfile(run_file):
        if top is not None:
            os.unlink(run_file)
            done.deleted.append(RUN_FILE)
        else:
            done.moved_to = done.moved_to or _aside_folder(output_dir)
            os.replace(run_file, os.path.join(done.moved_to, RUN_FILE))
            done.moved.append(RUN_FILE)
    if done.deleted:
        logger.warning("output_dir %s: deleted the earlier run's files that npu-ft wrote (%s)", output_dir,
                       ", ".join(done.deleted[:6]) + (" ..." if len(done.deleted) > 6 else ""))
    if done.moved:
        logger.warning("output_dir %s: moved the earlier run's other files (%s) to %s; delete that folder when you no "
                       "longer need them", output_dir, ", ".join(done.moved[:6]) + (" ..." if len(done.moved) > 6
                                                                                     else ""), done.moved_to)
    return done


def _aside_folder(output_dir: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", *(f"-{i}" for i in range(1, 1000))):
        path = os.path.join(output_dir, f"previous-run-{stamp}{suffix}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{output_dir}: too many previous-run-{stamp}-N folders")  # pragma: no cover
