"""Regenerate the golden files by running LLaMA-Factory 0.9.5's own data pipeline.

This script does NOT run under npu-ft's test suite; it needs a separate virtualenv with the real
LLaMA-Factory (CPU torch pinned so pip does not pull CUDA wheels):

    python -m venv /tmp/lfvenv
    /tmp/lfvenv/bin/pip install -c <(echo torch==2.13.0) llamafactory==0.9.5
    # PyPI's torchvision/torchaudio wheels do not import beside CPU torch 2.13 and break
    # transformers/peft imports; remove them. LF's mm_plugin imports torchaudio at module
    # import time, so this script puts an empty stub module in its place.
    /tmp/lfvenv/bin/pip uninstall -y torchvision torchaudio
    # the offline tokenizers (built by npu-ft) in its cache:
    python -c "from npu_ft.model.tokenizer import load_qwen_tokenizer as l; l(); l(variant='qwen3')"
    /tmp/lfvenv/bin/python tests/data/golden/make_golden.py

For every setting in SETTINGS it calls ``llamafactory.data.loader.get_dataset`` (dataset_info.json
parsing, `datasets` loading, alpaca/sharegpt conversion, val split, template, supervised or packed
processor) on tests/data/fixtures with our offline Qwen tokenizer, and writes
``tests/data/golden/<setting>.json`` with the resulting token ids. ``test_golden.py`` checks that
npu-ft's pipeline reproduces them exactly.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures"
CACHE = Path(os.environ.get("NPU_FT_CACHE", Path.home() / ".cache" / "npu_ft")) / "tokenizers"
TOKENIZERS = {"qwen2.5": CACHE / "qwen2.5-v1", "qwen3": CACHE / "qwen3-v1"}

_ALL_QWEN = "alpaca_demo,alpaca_history,sharegpt_demo,sharegpt_openai_tags,sharegpt_tools"
_QWEN3 = "sharegpt_thinking,sharegpt_demo,alpaca_history,sharegpt_tools"

# name -> (tokenizer variant, data arguments). Shared by make_golden.py and test_golden.py.
SETTINGS: dict[str, tuple[str, dict]] = {
    "qwen_alpaca": ("qwen2.5", dict(dataset="alpaca_demo,alpaca_history", template="qwen")),
    "qwen_sharegpt": ("qwen2.5", dict(dataset="sharegpt_demo,sharegpt_openai_tags,sharegpt_tools", template="qwen")),
    "qwen_train_on_prompt": ("qwen2.5", dict(dataset=_ALL_QWEN, template="qwen", train_on_prompt=True)),
    "qwen_mask_history": ("qwen2.5", dict(dataset=_ALL_QWEN, template="qwen", mask_history=True)),
    "qwen_default_system": ("qwen2.5", dict(dataset=_ALL_QWEN, template="qwen", default_system="Be brief.")),
    "qwen_cutoff_24": ("qwen2.5", dict(dataset=_ALL_QWEN, template="qwen", cutoff_len=24)),
    "qwen_cutoff_60": ("qwen2.5", dict(dataset=_ALL_QWEN, template="qwen", cutoff_len=60)),
    "qwen_cutoff_45_mask_history": (
        "qwen2.5",
        dict(dataset=_ALL_QWEN, template="qwen", cutoff_len=45, mask_history=True),
    ),
    "qwen_cutoff_30_train_on_prompt": (
        "qwen2.5",
        dict(dataset=_ALL_QWEN, template="qwen", cutoff_len=30, train_on_prompt=True),
    ),
    "qwen_packing": ("qwen2.5", dict(dataset=_ALL_QWEN, template="qwen", cutoff_len=200, packing=True)),
    "qwen_neat_packing": ("qwen2.5", dict(dataset=_ALL_QWEN, template="qwen", cutoff_len=256, neat_packing=True)),
    "qwen_val_size": ("qwen2.5", dict(dataset=_ALL_QWEN, template="qwen", val_size=0.25)),
    "qwen_max_samples": ("qwen2.5", dict(dataset="alpaca_demo,sharegpt_demo", template="qwen", max_samples=3)),
    "qwen3_sharegpt": ("qwen3", dict(dataset=_QWEN3, template="qwen3")),
    "qwen3_mask_history": ("qwen3", dict(dataset=_QWEN3, template="qwen3", mask_history=True)),
    "qwen3_no_thinking": ("qwen3", dict(dataset=_QWEN3, template="qwen3", enable_thinking=False)),
    "qwen3_preserve_thinking": (
        "qwen3",
        dict(dataset=_QWEN3, template="qwen3", mask_history=True, preserve_thinking=True),
    ),
    "qwen3_cutoff_32": ("qwen3", dict(dataset=_QWEN3, template="qwen3", cutoff_len=32)),
    "qwen3_neat_packing": ("qwen3", dict(dataset=_QWEN3, template="qwen3", cutoff_len=256, neat_packing=True)),
    "qwen3_nothink": ("qwen3", dict(dataset=_QWEN3, template="qwen3_nothink")),
}


_MUTATED = ("default_system", "enable_thinking", "preserve_thinking", "format_function", "format_tools")


def _rows(dataset) -> list[dict]:
    keep = ("input_ids", "labels", "attention_mask", "position_ids")
    rows = []
    for row in dataset:
        item = {k: list(row[k]) for k in keep if k in row and row[k] is not None}
        if "position_ids" not in row and item["attention_mask"] == [1] * len(item["input_ids"]):
            del item["attention_mask"]  # all ones: not worth storing
        rows.append(item)
    return rows


def main() -> None:
    stub = types.ModuleType("torchaudio")  # see module docstring
    stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    sys.modules.setdefault("torchaudio", stub)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import llamafactory
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.loader import get_dataset
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import AutoTokenizer, Seq2SeqTrainingArguments

    only = set(sys.argv[1:])
    for name, (variant, kwargs) in SETTINGS.items():
        if only and name not in only:
            continue
        # get_template_and_fix_tokenizer mutates the registered template (default_system, thinking
        # flags); restore it so one setting does not leak into the next in this process.
        registered = TEMPLATES[kwargs["template"]]
        saved = {k: getattr(registered, k) for k in _MUTATED}
        tok_dir = str(TOKENIZERS[variant])
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        tokenizer.padding_side = "right"
        with tempfile.TemporaryDirectory() as tmp:
            data_args = DataArguments(dataset_dir=str(FIXTURES), overwrite_cache=True, **kwargs)
            model_args = ModelArguments(model_name_or_path=tok_dir, cache_dir=os.path.join(tmp, "cache"))
            training_args = Seq2SeqTrainingArguments(output_dir=os.path.join(tmp, "out"), seed=42, report_to=[])
            template = get_template_and_fix_tokenizer(tokenizer, data_args)
            module = get_dataset(template, model_args, data_args, training_args, "sft", tokenizer)
            result = {
                "generator": f"llamafactory {llamafactory.__version__} (tests/data/golden/make_golden.py)",
                "tokenizer": variant,
                "data_args": kwargs,
                "train": _rows(module["train_dataset"]),
            }
            if module.get("eval_dataset") is not None:
                result["eval"] = _rows(module["eval_dataset"])
        for key, value in saved.items():
            setattr(registered, key, value)
        out = HERE / f"{name}.json"
        out.write_text(json.dumps(result, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"wrote {out.name}: {len(result['train'])} train rows", flush=True)


if __name__ == "__main__":
    main()
