"""``npu-ft export [CONFIG.yaml] [key=value ...]``: merge LoRA adapter(s) into the base model and
write an ordinary Hugging Face folder.

Keys are LLaMA-Factory's (:data:`EXPORT_KEYS`): ``model_name_or_path``, ``adapter_name_or_path``,
``template``, ``export_dir``, ``export_size``, ``export_device``, ``export_legacy_format``; with
``quantization_bit: 4`` the base is quantized to NF4 first, the (single) adapter loaded on top as
its config says (LoRA, DoRA, LoRA-FA or VeRA) and everything merged into dequantized weights, i.e.
the exact function the QLoRA-style run trained.

Everything is checked before the model is loaded: the keys and values, each adapter's files
(``adapter_config.json`` and the safetensors header), and the export folder
(:mod:`npu_ft.train.export_folder`: npu-ft replaces only a previous export of its own, never a
folder it reads, and writes through a staging folder). Exit status as every subcommand
(:mod:`npu_ft.cli_common`): 1 with one line naming the file or key.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npu_ft.cli_common import EXIT_USAGE, is_input_error, one_line, report, wants_help

from .export_folder import ExportError, check_export_dir, publish

__all__ = ["EXPORT_KEYS", "ExportError", "export_main", "export_model", "load_export_options"]

_USAGE = "npu-ft export [CONFIG.yaml] [key=value ...]"

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


def _read_argv(argv: list[str]) -> tuple[dict[str, Any], dict[str, str], str]:
    """``[CONFIG.yaml] [key=value | --key value ...]`` -> (values, where each came from, recipe source)."""
    from npu_ft.config import parse_overrides
    from npu_ft.config.yaml_io import load_yaml_mapping

    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    source = "command line"
    if argv and "=" not in argv[0] and not argv[0].startswith("--"):
        source = argv.pop(0)
        data = load_yaml_mapping(source)
        raw.update(data)
        sources.update({k: source for k in data})
    pairs: list[str] = []
    i = 0
    while i < len(argv):  # "--key value" as well as "key=value"
        item = argv[i]
        if item.startswith("--") and "=" not in item and i + 1 < len(argv):
            pairs.append(f"{item[2:]}={argv[i + 1]}")
            i += 2
        else:
            pairs.append(item)
            i += 1
    for key, value, text in parse_overrides(pairs):
        raw[key] = value
        sources[key] = f"command-line override '{text}'"
    return raw, sources, source


def load_export_options(argv: Sequence[str]) -> dict[str, Any]:
    """Read ``[CONFIG.yaml] [key=value ...]`` into a checked dict of export options (everything
    that can be checked without loading the model, the export folder included)."""
    from npu_ft.config import OPTIONS

    raw, sources, source = _read_argv(list(argv))

    def where(key: str) -> str:
        return f"{sources.get(key, source)}: key '{key}'"

    opts = dict(EXPORT_KEYS)
    for key, value in raw.items():
        if key in _EXPORT_UNSUPPORTED and value not in (None, False):
            raise ExportError(f"{where(key)}: not supported by npu-ft export yet")
        if key in EXPORT_KEYS:
            opts[key] = value
        elif key not in OPTIONS and key not in _EXPORT_UNSUPPORTED:  # a training key in a shared recipe: no effect
            close = difflib.get_close_matches(key, [*EXPORT_KEYS, *OPTIONS], n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ExportError(f"{sources.get(key, source)}: unknown key '{key}'{hint}")
    for key in ("model_name_or_path", "export_dir"):
        if not opts[key]:
            raise ExportError(f"{where(key)}: is required for export")
    size = opts["export_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ExportError(f"{where('export_size')}: expected a whole number of GB >= 1 per weights shard, "
                          f"got {size!r}")
    if opts["finetuning_type"] not in ("lora", "vera", "full"):
        raise ExportError(f"{where('finetuning_type')}: expected lora, vera or full, got "
                          f"{opts['finetuning_type']!r}")
    if opts["quantization_bit"] not in (None, 4):
        raise ExportError(f"{where('quantization_bit')}: only 4 (NF4) is supported, got {opts['quantization_bit']!r}")
    adapters = opts["adapter_name_or_path"]
    if isinstance(adapters, str):
        adapters = [a.strip() for a in adapters.split(",") if a.strip()]
    opts["adapter_name_or_path"] = [str(a) for a in adapters] if adapters else []
    if opts["quantization_bit"] is not None and not opts["adapter_name_or_path"]:
        raise ExportError(f"{where('quantization_bit')}: exporting a quantized model without an adapter is not "
                          "supported (nothing to merge)")
    if opts["quantization_bit"] is not None and len(opts["adapter_name_or_path"]) > 1:
        raise ExportError(f"{where('adapter_name_or_path')}: a quantized base takes a single adapter (as "
                          "LLaMA-Factory); merge the others first, then export the last one over the merged model")
    _check_model_and_device(opts, source)
    for adapter in opts["adapter_name_or_path"]:
        check_adapter_files(Path(adapter), where("adapter_name_or_path"))
    opts["_read_folders"] = {"model_name_or_path": [str(opts["model_name_or_path"])],
                             "adapter_name_or_path": opts["adapter_name_or_path"]}
    opts["_where"] = source
    check_export_dir(Path(opts["export_dir"]), source, opts["_read_folders"])
    return opts


def _check_model_and_device(opts: dict[str, Any], source: str) -> None:
    from npu_ft.device import get_backend
    from npu_ft.model.loading import ModelLoadError, resolve_model_path

    try:
        resolve_model_path(opts["model_name_or_path"])
    except ModelLoadError as exc:
        raise ExportError(f"{source}: {exc}") from None
    get_backend(_export_device(opts))


def _export_device(opts: dict[str, Any]) -> str:
    """LLaMA-Factory's ``export_device`` (cpu | auto; auto merges on the CPU here) or npu-ft's ``device``."""
    name = str(opts.get("device") or opts.get("export_device") or "cpu")
    return "cpu" if name == "auto" else name


def check_adapter_files(folder: Path, where: str) -> None:
    """A LoRA adapter folder whose config parses and whose weights file is a readable safetensors file."""
    from safetensors import SafetensorError, safe_open

    from .adapter_io import read_adapter_config

    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ExportError(f"{where}: {str(folder)!r} is not an adapter folder (no adapter_config.json)")
    try:
        config = json.loads(config_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{config_path}: not a valid adapter config ({one_line(exc)})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{config_path}: not a valid adapter config (expected a JSON object)")
    for key in ("r", "target_modules"):
        if key not in config:
            raise ExportError(f"{config_path}: key '{key}' is missing")
    try:
        read_adapter_config(folder)  # what npu-ft supports (peft_type, DoRA, bias, ...)
    except ValueError as exc:
        raise ExportError(one_line(exc)) from None
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights}: not found (the adapter's weights)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (OSError, SafetensorError) as exc:
        raise ExportError(f"{weights}: not a readable safetensors file ({one_line(exc)})") from None


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


def _merged_model(opts: dict[str, Any], folder: Path):
    """The base model with every adapter merged in, on the CPU in the output dtype."""
    import torch

    from npu_ft.device import get_backend
    from npu_ft.model.loading import load_model
    from npu_ft.modules.inject import merge_adapter, quantize_base

    from .adapter_io import load_adapter, read_adapter_config

    out_dtype = _export_dtype(opts, folder)
    device = get_backend(_export_device(opts)).torch_device()
    # merge in fp32 (on the export device), then cast to the output dtype
    model = load_model({"model_name_or_path": str(folder), "trust_remote_code": opts["trust_remote_code"]},
                       device=device, dtype=torch.float32)
    for adapter in opts["adapter_name_or_path"]:
        if opts["quantization_bit"] == 4:  # the NF4 base the adapter (LoRA, DoRA, LoRA-FA, VeRA) trained on
            quantize_base(model, read_adapter_config(adapter).get("modules_to_save"),
                          double_quant=bool(opts["double_quantization"]), compute_dtype=torch.float32)
        try:
            load_adapter(model, adapter, strict=True)
        except (FileNotFoundError, ValueError) as exc:  # adapter files that do not fit the model
            raise ExportError(one_line(exc)) from None
        merge_adapter(model)
    model = model.to(device="cpu", dtype=out_dtype)
    model.requires_grad_(False)
    model.config.use_cache = True
    return model


def export_model(opts: dict[str, Any]) -> Path:
    """Merge ``opts['adapter_name_or_path']`` into the base model and write ``opts['export_dir']``
    (``opts`` from :func:`load_export_options`) through a staging folder."""
    from transformers import AutoTokenizer

    from npu_ft import __version__
    from npu_ft.model.loading import resolve_model_path

    folder = resolve_model_path(opts["model_name_or_path"])
    model = _merged_model(opts, folder)

    def write(staging: Path) -> None:
        model.save_pretrained(str(staging), max_shard_size=f"{opts['export_size']}GB",
                              safe_serialization=not opts["export_legacy_format"])
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                      trust_remote_code=bool(opts["trust_remote_code"]))
        except (OSError, ValueError):
            return  # a base folder without tokenizer files: export the weights only
        tokenizer.save_pretrained(str(staging))

    info = {"npu_ft_version": __version__, "model_name_or_path": str(opts["model_name_or_path"]),
            "adapter_name_or_path": list(opts["adapter_name_or_path"])}
    return publish(Path(opts["export_dir"]), write, opts["_where"], opts["_read_folders"], info)


def export_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if wants_help(argv):
        print(f"usage: {_USAGE}\n\nMerge LoRA adapter(s) into the base model and write a Hugging Face "
              "folder.\nkeys: " + ", ".join(EXPORT_KEYS))
        return 0
    if not argv:
        print(f"usage: {_USAGE}\nnpu-ft export: error: give an export recipe or key=value pairs", file=sys.stderr)
        return EXIT_USAGE
    try:
        out = export_model(load_export_options(argv))
    except Exception as exc:
        if not is_input_error(exc):
            raise
        return report("npu-ft export", exc)
    print(f"npu-ft export: wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(export_main(sys.argv[1:]))
