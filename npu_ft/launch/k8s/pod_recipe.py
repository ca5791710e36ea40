"""The recipe a pod trains from, built as data and read back exactly as ``npu-ft train`` reads it.

The recipe file's mapping, with the command-line overrides parsed the way ``npu-ft train`` parses
them, is dumped with ``yaml.safe_dump``: an override value holding a newline or ``: `` stays one
string value and can never add keys. Two keys change on the way into the pod:

* ``overwrite_output_dir: false`` -- a pod restarted after a failure (``restartPolicy: OnFailure``)
  then resumes from the last ``checkpoint-N`` in ``output_dir`` (LLaMA-Factory's rule) instead of
  training again from step 0;
* ``deepspeed:`` -- when it names a JSON file, the file travels in the ConfigMap and the key points
  at its copy under ``/etc/npu-ft``.

Before anything is written the dumped text goes through ``load_config`` from a temporary file and
must give the same configuration as the recipe plus overrides (with those two keys changed).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..torchrun import LaunchError

__all__ = ["CONFIG_DIR", "PodRecipe", "build_pod_recipe"]

#: where the ConfigMap (recipe.yaml, ds_config.json) is mounted in the pods
CONFIG_DIR = "/etc/npu-ft"

_HEADER = (
    "# The recipe this job trains from, written by `npu-ft k8s` (the source recipe and the overrides are\n"
    "# named in this ConfigMap's annotations). overwrite_output_dir is false so that a pod restarted after\n"
    "# a failure resumes from the last checkpoint-N in output_dir instead of starting again at step 0.\n"
)


@dataclasses.dataclass(frozen=True)
class PodRecipe:
    """``recipe.yaml`` for the ConfigMap, what ``npu-ft train`` reads from it, and notes for the user."""

    text: str
    config: Any  # npu_ft.config.SftConfig
    notes: tuple[str, ...] = ()


def build_pod_recipe(recipe: Path, overrides: Sequence[str], cfg: Any, *, ds_file: bool) -> PodRecipe:
    """The pod's recipe for ``recipe`` + ``overrides`` (``cfg`` is ``load_config(recipe, overrides)``)."""
    from npu_ft.config import parse_overrides
    from npu_ft.config.yaml_io import load_yaml_mapping, load_yaml_text

    mapping: dict[str, Any] = dict(load_yaml_mapping(recipe))
    for key, value, _ in parse_overrides(overrides):
        mapping[key] = value
    changed: dict[str, Any] = {"overwrite_output_dir": False}
    if ds_file:  # the JSON travels in the ConfigMap
        changed["deepspeed"] = f"{CONFIG_DIR}/ds_config.json"
    mapping.update(changed)
    notes = []
    if cfg.overwrite_output_dir:
        notes.append("the pod's recipe sets overwrite_output_dir: false (the recipe says true) so that a "
                     "restarted pod resumes from its last checkpoint; give each job its own output_dir")
    if cfg.resume_from_checkpoint in (True, "true", "True"):
        notes.append("resume_from_checkpoint: true fails on the job's first start (no checkpoint yet); the pod "
                     "resumes from the last checkpoint without it")
    if cfg.save_strategy == "no" or cfg.save_only_model:
        notes.append("the recipe saves no resumable checkpoints (save_strategy: no or save_only_model: true): "
                     "a pod restarted after a failure trains again from step 0")

    text = _HEADER + yaml.safe_dump(mapping, sort_keys=False, allow_unicode=True, default_flow_style=False,
                                    width=120)
    if load_yaml_text(text, "pod recipe") != mapping:
        raise LaunchError(f"{recipe}: the pod's recipe does not read back as written (an override value "
                          "would change its structure)")
    config = _read_back(text, {**cfg.to_dict(), **changed}, recipe)
    return PodRecipe(text=text, config=config, notes=tuple(notes))


def _read_back(text: str, expected: dict[str, Any], recipe: Path) -> Any:
    """``load_config`` the dumped text from a file, as ``npu-ft train`` will; every key must have the
    ``expected`` value. Returns the loaded config."""
    from npu_ft.config import ConfigError, load_config

    with tempfile.TemporaryDirectory(prefix="npu-ft-k8s-") as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            got = load_config(path)
        except ConfigError as exc:
            raise LaunchError(f"{recipe}: the pod's recipe would not load: {exc}") from None
    differ = sorted(k for k, v in got.to_dict().items() if expected.get(k) != v)
    if differ:
        raise LaunchError(f"{recipe}: the pod's recipe reads back differently for {', '.join(differ)}")
    return got
