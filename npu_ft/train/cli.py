"""``npu-ft train`` and ``npu-ft export``.

``npu-ft train CONFIG.yaml [key=value ...]``: LLaMA-Factory keys; overrides after the file, as
``llamafactory-cli train``. Exit status 0 on success; 1 with a one-paragraph message (naming the
file, key or line) for a bad recipe, dataset, model folder or device, or a NaN/inf loss; the
traceback is printed only with ``NPU_FT_DEBUG=1``.

``npu-ft export CONFIG.yaml [key=value ...]`` or ``npu-ft export key=value ...``: merge LoRA
adapter(s) into the base model and write an ordinary Hugging Face folder (LLaMA-Factory's export
keys: ``model_name_or_path``, ``adapter_name_or_path``, ``template``, ``export_dir``,
``export_size``, ``export_device``, ``export_legacy_format``; with ``quantization_bit: 4`` the base is
quantized to NF4 first, the adapter loaded on top and everything merged into dequantized weights,
i.e. the exact function the QLoRA run trained).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["EXPORT_KEYS", "export_main", "export_model", "load_export_options", "train_main"]

_USAGE_TRAIN = "npu-ft train CONFIG.yaml [key=value ...]"
_USAGE_EXPORT = "npu-ft export [CONFIG.yaml] [key=value ...]"


def _known_errors() -> tuple[type[BaseException], ...]:
    from npu_ft.data import DataFileError, DataFormatError, DatasetInfoError
    from npu_ft.device import DeviceUnavailableError
    from npu_ft.model.loading import ModelLoadError

    from .callbacks import NonFiniteLossError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .run import TrainingError

    return (ConfigError, TrainingError, DatasetInfoError, DataFileError, DataFormatError, ModelLoadError,
            CheckpointError, NonFiniteLossError, DeviceUnavailableError, ExportError)


def _fail(prog: str, exc: BaseException) -> int:
    if os.environ.get("NPU_FT_DEBUG"):
        traceback.print_exc()
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def train_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {_USAGE_TRAIN}\n\nFine-tune from a LLaMA-Factory 0.9.5 style YAML recipe "
              "(see docs/training.md and docs/config.md).")
        return 0 if argv else 2
    from npu_ft.launch import launch_or_init  # torchrun when >1 process/node; strips --nproc-per-node & co.
    if (rc := launch_or_init(argv)) is not None:
        return rc
    config_path, overrides = argv[0], argv[1:]
    if "=" in config_path and not os.path.exists(config_path):
        print(f"npu-ft train: error: the first argument must be the YAML recipe, got {config_path!r}\n"
              f"usage: {_USAGE_TRAIN}", file=sys.stderr)
        return 2
    known = _known_errors()
    try:
        from .config import load_config
        from .run import run_sft

        cfg = load_config(config_path, overrides)
        result = run_sft(cfg)
    except known as exc:
        return _fail("npu-ft train", exc)
    except KeyboardInterrupt:
        print("npu-ft train: interrupted (complete checkpoints are kept; resume with "
              "resume_from_checkpoint=true)", file=sys.stderr)
        return 130
    print(f"npu-ft train: done: {result.method} on {result.device}, {result.global_step} steps; "
          f"outputs in {result.output_dir}")
    return 0


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
class ExportError(ValueError):
    """A bad export recipe: names the file/key."""


#: export keys (LLaMA-Factory's names) -> default
EXPORT_KEYS: dict[str, Any] = {
    "model_name_or_path": None,
    "adapter_name_or_path": None,
    "template": None,
    "finetuning_type": "lora",
    "trust_remote_code": False,
    "export_dir": None,
    "export_size": 5,
    "export_device": "cpu",
    "export_legacy_format": False,
    "quantization_bit": None,
    "quantization_type": "nf4",
    "double_quantization": True,
    "infer_dtype": "auto",
    "device": None,
}
_EXPORT_UNSUPPORTED = {"export_quantization_bit", "export_quantization_dataset", "export_hub_model_id"}


def load_export_options(argv: Sequence[str]) -> dict[str, Any]:
    """Read ``[CONFIG.yaml] [key=value ...]`` into a checked dict of export options."""
    import yaml

    from .config import OPTIONS, parse_overrides

    argv = list(argv)
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    source = "command line"
    if argv and "=" not in argv[0] and not argv[0].startswith("--"):
        path = Path(argv.pop(0))
        source = str(path)
        if not path.is_file():
            raise ExportError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ExportError(f"{path}: invalid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ExportError(f"{path}: expected a mapping of key: value at the top level")
        raw.update(data)
        sources.update({k: str(path) for k in data})
    # allow "--key value" as well as "key=value"
    pairs: list[str] = []
    i = 0
    while i < len(argv):
        item = argv[i]
        if item.startswith("--") and "=" not in item and i + 1 < len(argv):
            pairs.append(f"{item[2:]}={argv[i + 1]}")
            i += 2
        else:
            pairs.append(item)
            i += 1
    try:
        parsed = parse_overrides(pairs)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    for key, value, text in parsed:
        raw[key] = value
        sources[key] = f"command-line override '{text}'"

    opts = dict(EXPORT_KEYS)
    for key, value in raw.items():
        where = sources.get(key, source)
        if key in _EXPORT_UNSUPPORTED and value not in (None, False):
            raise ExportError(f"{where}: key '{key}': not supported by npu-ft export yet")
        if key in EXPORT_KEYS:
            opts[key] = value
        elif key in OPTIONS or key in _EXPORT_UNSUPPORTED:
            continue  # a training key in a shared recipe: no effect on export
        else:
            close = difflib.get_close_matches(key, [*EXPORT_KEYS, *OPTIONS], n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ExportError(f"{where}: unknown key '{key}'{hint}")
    for key in ("model_name_or_path", "export_dir"):
        if not opts[key]:
            raise ExportError(f"{source}: key '{key}': is required for export")
    if opts["finetuning_type"] not in ("lora", "full"):
        raise ExportError(f"{sources.get('finetuning_type', source)}: key 'finetuning_type': "
                          f"expected lora or full, got {opts['finetuning_type']!r}")
    if opts["quantization_bit"] not in (None, 4):
        raise ExportError(f"{sources.get('quantization_bit', source)}: key 'quantization_bit': only 4 (NF4) "
                          f"is supported, got {opts['quantization_bit']!r}")
    if opts["quantization_bit"] is not None and not opts["adapter_name_or_path"]:
        raise ExportError(f"{source}: key 'quantization_bit': exporting a quantized model without an adapter "
                          "is not supported (nothing to merge)")
    adapters = opts["adapter_name_or_path"]
    if isinstance(adapters, str):
        adapters = [a.strip() for a in adapters.split(",") if a.strip()]
    opts["adapter_name_or_path"] = list(adapters) if adapters else []
    for adapter in opts["adapter_name_or_path"]:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ExportError(f"{sources.get('adapter_name_or_path', source)}: key 'adapter_name_or_path': "
                              f"{adapter!r} is not an adapter folder (no adapter_config.json)")
    if os.path.abspath(opts["export_dir"]) == os.path.abspath(str(opts["model_name_or_path"])):
        raise ExportError(f"{source}: key 'export_dir': must differ from model_name_or_path")
    opts["_source"] = source
    return opts


def _export_dtype(opts: dict[str, Any], folder: Path):
    import torch

    from npu_ft.model.loading import resolve_dtype

    name = str(opts.get("infer_dtype") or "auto").lower()
    if name != "auto":
        return resolve_dtype(name)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    try:
        return resolve_dtype(str(value))
    except ValueError:
        return torch.float32


def export_model(opts: dict[str, Any]) -> Path:
    """Merge ``opts['adapter_name_or_path']`` into the base model and write ``opts['export_dir']``.

    The folder is written under a temp name next to ``export_dir`` and renamed into place.
    """
    import torch
    from transformers import AutoTokenizer

    from npu_ft.device import get_backend
    from npu_ft.model.loading import load_model, resolve_model_path
    from npu_ft.modules.inject import apply_qlora, merge_adapter

    from .adapter_io import load_adapter, read_adapter_config

    folder = resolve_model_path(opts["model_name_or_path"])
    out_dtype = _export_dtype(opts, folder)
    device_name = opts.get("device") or opts.get("export_device") or "cpu"
    backend = get_backend("cpu" if device_name == "auto" else device_name)
    device = backend.torch_device()
    # merge in fp32 (on the export device), then cast to the output dtype
    model = load_model({"model_name_or_path": str(folder), "trust_remote_code": opts["trust_remote_code"]},
                       device=device, dtype=torch.float32)
    for adapter in opts["adapter_name_or_path"]:
        if opts["quantization_bit"] == 4:
            config = read_adapter_config(adapter)
            apply_qlora(model, list(config["target_modules"]), r=int(config["r"]),
                        alpha=config.get("lora_alpha", 8), use_rslora=bool(config.get("use_rslora")),
                        additional_target=config.get("modules_to_save"),
                        double_quant=bool(opts["double_quantization"]), compute_dtype=torch.float32)
        load_adapter(model, adapter, strict=True)
        merge_adapter(model)
    model = model.to(device="cpu", dtype=out_dtype)
    model.requires_grad_(False)
    model.config.use_cache = True

    export_dir = Path(opts["export_dir"])
    staging = export_dir.parent / f".tmp-{export_dir.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(str(staging), max_shard_size=f"{opts['export_size']}GB",
                              safe_serialization=not opts["export_legacy_format"])
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                      trust_remote_code=bool(opts["trust_remote_code"]))
            tokenizer.save_pretrained(str(staging))
        except (OSError, ValueError):
            pass  # a base folder without tokenizer files: export the weights only
        if export_dir.exists():
            old = export_dir.parent / f".old-{export_dir.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(export_dir, old)
            os.replace(staging, export_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export_dir


def export_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {_USAGE_EXPORT}\n\nMerge LoRA adapter(s) into the base model and write a Hugging Face "
              "folder.\nkeys: " + ", ".join(EXPORT_KEYS))
        return 0 if argv else 2
    try:
        opts = load_export_options(argv)
        out = export_model(opts)
    except _known_errors() as exc:
        return _fail("npu-ft export", exc)
    except (FileNotFoundError, ValueError) as exc:  # adapter files that do not fit the model
        return _fail("npu-ft export", exc)
    print(f"npu-ft export: wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser()
    sys.exit(train_main(sys.argv[1:]))
