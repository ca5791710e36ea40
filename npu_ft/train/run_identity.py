"""Run identity: which run made a checkpoint, so a resume never continues another run's training.

Every run writes ``npu_ft_run.json`` into ``output_dir`` when it starts and into every
``checkpoint-N``. It holds a fingerprint (sha256) over what decides the training trajectory, a
readable copy of those values (so a refusal can say what differs), and the list of files npu-ft
wrote into that folder (name, size, mtime; what ``overwrite_output_dir`` may delete).

The fingerprint covers:

* the model folder's *content*: sha256 of its small files (``*.json``, ``*.txt``, ``*.model``,
  ``*.jinja``: config, tokenizer, chat template) and, per ``*.safetensors`` file, its size, its
  first and last MiB (the header) and 8 samples of 64 KiB spread over it. The path itself is shown
  but not fingerprinted: a moved model folder still resumes;
* the data: each dataset's ``dataset_info.json`` entry and the sha256 of each of its files (files
  over 256 MiB: size + samples, as weights); ``dataset_dir`` is shown, not fingerprinted;
* the config keys in :data:`METHOD_KEYS`, :data:`DATA_KEYS` and :data:`TRAJECTORY_KEYS`, plus the
  method (lora | qlora | full).

Not in it (a resume may change them): output/logging/saving keys, the device, the number of
processes, gradient checkpointing, ``fused_cross_entropy`` and other keys that change speed or
memory but not the update. See docs/training.md ("Guarantees").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """resume_from_checkpoint names something that cannot be resumed from (here: a checkpoint of
    another run; :mod:`npu_ft.train.checkpoint` raises it for everything else)."""

__all__ = [
    "DATA_KEYS",
    "METHOD_KEYS",
    "RUN_FILE",
    "TRAJECTORY_KEYS",
    "RunIdentity",
    "check_same_run",
    "compute_identity",
    "file_digest",
    "read_run_file",
    "snapshot_files",
    "write_run_file",
]

RUN_FILE = "npu_ft_run.json"
FORMAT = 1

METHOD_KEYS = ("finetuning_type", "quantization_bit", "quantization_type", "double_quantization", "lora_rank",
               "lora_alpha", "lora_dropout", "lora_target", "additional_target", "use_rslora", "loraplus_lr_ratio",
               "loraplus_lr_embedding", "pure_bf16")
#: method keys that joined later: part of the identity only when switched on (VeRA's: only for VeRA),
#: so checkpoints of runs that never used them keep their identity
OPTIONAL_METHOD_KEYS = ("use_dora", "pissa_init", "lora_fa", "shift_attn")
VERA_KEYS = ("vera_rank", "vera_d_initial", "vera_projection_prng_key")
DATA_KEYS = ("dataset", "eval_dataset", "template", "cutoff_len", "train_on_prompt", "mask_history", "packing",
             "neat_packing", "default_system", "enable_thinking", "tool_format", "val_size", "max_samples",
             "mix_strategy", "preprocessing_batch_size", "disable_shuffling")
TRAJECTORY_KEYS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                   "num_train_epochs", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps",
                   "weight_decay", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon",
                   "max_grad_norm", "seed", "data_seed", "bf16", "fp16")

_SMALL_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_FULL_HASH_LIMIT = 256 << 20
_SAMPLE = 64 << 10
_EDGE = 1 << 20


# ---------------------------------------------------------------------------------------------
# digests
# ---------------------------------------------------------------------------------------------
def _sha(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str, sampled: bool | None = None) -> str:
    """sha256 of a file; for a big file (or ``sampled=True``): of its size, its first and last MiB
    and 8 slices of 64 KiB spread evenly between them."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if sampled is None:
            sampled = size > _FULL_HASH_LIMIT
        if not sampled or size <= 2 * _EDGE + 8 * _SAMPLE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        offsets = [0] + [_EDGE + i * (size - 2 * _EDGE - _SAMPLE) // 7 for i in range(8)] + [size - _EDGE]
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(_EDGE if offset in (0, size - _EDGE) else _SAMPLE))
    return "sampled:" + h.hexdigest()


def _model_part(model_path: str) -> dict[str, Any]:
    folder = os.path.realpath(os.path.expanduser(model_path))
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            files[name] = file_digest(path, sampled=True)
        elif name.endswith(_SMALL_SUFFIXES):
            files[name] = file_digest(path)
    return {"path": folder, "files": files}


def _data_part(cfg: Any) -> dict[str, Any]:
    from npu_ft.data import get_dataset_attrs
    from npu_ft.data.readers import list_data_files

    dataset_dir = str(cfg.get("dataset_dir") or "data")
    datasets: dict[str, Any] = {}
    for names in (cfg.get("dataset"), cfg.get("eval_dataset")):
        for attr in get_dataset_attrs(names, dataset_dir):
            files = {os.path.relpath(f, dataset_dir): file_digest(f)
                     for f in list_data_files(dataset_dir, attr.file_name)}
            datasets[attr.name] = {"entry": _sha(dataclasses.asdict(attr)), "files": files}
    return {"dataset_dir": os.path.realpath(dataset_dir), "datasets": datasets}


def _plain(value: Any) -> Any:
    """A config value as JSON data (tuples as lists, unknown objects as text)."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------
# the identity
# ---------------------------------------------------------------------------------------------
@dataclass
class RunIdentity:
    """What one run is: its fingerprint and the readable values behind it."""

    fingerprint: str
    keys: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    files: dict[str, list[int]] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.fingerprint[:12]

    @property
    def method(self) -> str | None:
        return self.keys.get("method")

    def to_dict(self) -> dict[str, Any]:
        from npu_ft import __version__

        return {"format": FORMAT, "run_id": self.run_id, "fingerprint": self.fingerprint, "npu_ft": __version__,
                "keys": self.keys, "model": self.model, "data": self.data, "files": self.files}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunIdentity:
        return cls(fingerprint=str(data["fingerprint"]), keys=dict(data.get("keys") or {}),
                   model=dict(data.get("model") or {}), data=dict(data.get("data") or {}),
                   files=dict(data.get("files") or {}))

    def differences(self, other: RunIdentity) -> list[tuple[str, str, str]]:
        """``(what, self's value, other's value)`` for everything fingerprinted that differs."""
        out = []
        for key in sorted(set(self.keys) | set(other.keys)):
            mine, theirs = self.keys.get(key), other.keys.get(key)
            if mine != theirs:
                out.append((key, _show(mine), _show(theirs)))
        model_diffs = _file_diffs("model file", self.model.get("files", {}), other.model.get("files", {}))
        out += model_diffs
        if model_diffs and self.model.get("path") != other.model.get("path"):
            out.append(("model folder", str(self.model.get("path")), str(other.model.get("path"))))
        mine_sets, their_sets = self.data.get("datasets", {}), other.data.get("datasets", {})
        for name in sorted(set(mine_sets) & set(their_sets)):
            a, b = mine_sets[name], their_sets[name]
            if a["entry"] != b["entry"]:
                out.append((f"dataset_info.json entry of {name}", _short(a["entry"]), _short(b["entry"])))
            out += _file_diffs("data file", a["files"], b["files"])
        return out


def _file_diffs(what: str, mine: dict[str, str], theirs: dict[str, str]) -> list[tuple[str, str, str]]:
    names = sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
    return [(f"{what} {n}", _short(mine.get(n)), _short(theirs.get(n))) for n in names[:3]]


def _short(digest: str | None) -> str:
    return "absent" if digest is None else "sha256 " + digest.removeprefix("sampled:")[:8]


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def compute_identity(cfg: Any) -> RunIdentity:
    """The identity of the run ``cfg`` describes (reads the model folder's small files and the data)."""
    keys = {name: _plain(cfg.get(name)) for name in (*METHOD_KEYS, *DATA_KEYS, *TRAJECTORY_KEYS)}
    switched_on = [name for name in OPTIONAL_METHOD_KEYS if cfg.get(name)]
    if cfg.get("pissa_init"):
        switched_on.append("pissa_iter")
    if cfg.get("finetuning_type") == "vera":
        switched_on.extend(VERA_KEYS)
    keys.update({name: _plain(cfg.get(name)) for name in switched_on})
    keys["method"] = cfg.method
    model, data = _model_part(str(cfg.model_name_or_path)), _data_part(cfg)
    fingerprint = _sha({"keys": keys, "model": model["files"], "data": data["datasets"]})
    return RunIdentity(fingerprint=fingerprint, keys=keys, model=model, data=data)


# ---------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------
def snapshot_files(folder: str, exclude: tuple[str, ...] = (RUN_FILE,)) -> dict[str, list[int]]:
    """``{relative path: [size, mtime_ns]}`` of every file under ``folder``."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel in exclude or os.path.islink(path):
                continue
            st = os.stat(path)
            out[rel] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(out.items()))


def write_run_file(folder: str, identity: RunIdentity, files: dict[str, list[int]] | None = None) -> str:
    """Write ``folder/npu_ft_run.json`` (temp file + rename); ``files``: what npu-ft wrote there."""
    data = identity.to_dict()
    data["files"] = files or {}
    path = os.path.join(folder, RUN_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_run_file(folder: str) -> RunIdentity | None:
    """The identity recorded in ``folder`` (None: no file, or not one npu-ft wrote)."""
    path = os.path.join(folder, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return None
        return RunIdentity.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _context(identity: RunIdentity) -> str:
    datasets = ",".join(identity.keys.get("dataset") or [])
    return f"{identity.method}, dataset {datasets}"


def check_same_run(checkpoint: str, identity: RunIdentity, automatic: bool) -> None:
    """Raise ``CheckpointError`` if ``checkpoint`` was made by another run (a different identity).

    A checkpoint without ``npu_ft_run.json`` (LLaMA-Factory, or npu-ft before run identities) is
    accepted with a warning. ``automatic``: the checkpoint was picked from output_dir (the advice
    differs).
    """
    recorded = read_run_file(checkpoint)
    if recorded is None:
        logger.warning("%s has no %s (written by LLaMA-Factory or an older npu-ft): resuming it without checking "
                       "that it comes from this run", checkpoint, RUN_FILE)
        return
    if recorded.fingerprint == identity.fingerprint:
        return
    diffs = recorded.differences(identity)
    theirs = "; ".join(f"{what} {old}" for what, old, _ in diffs) or "other content"
    ours = "; ".join(f"{what} {new}" for what, _, new in diffs) or "other content"
    if automatic:
        advice = ("choose another output_dir, set overwrite_output_dir: true to start over (the earlier run's files "
                  "are set aside)")
    else:
        advice = "point resume_from_checkpoint at a checkpoint of this run"
    raise CheckpointError(
        f"{checkpoint} was made by run {recorded.run_id} ({_context(recorded)}: {theirs}); this run is "
        f"{identity.run_id} ({_context(identity)}: {ours}). Resuming would continue another run's training: "
        f"{advice}, or delete {os.path.join(checkpoint, RUN_FILE)} to resume it anyway")
