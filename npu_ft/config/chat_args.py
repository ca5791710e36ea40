"""The keys of ``npu-ft chat`` (LLaMA-Factory's inference YAML: model, adapters, template,
generation), read from a YAML file and/or the command line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .generation_args import GeneratingArguments
from .schema import config_field

__all__ = ["ChatArguments"]


@dataclass
class ChatModelArguments:
    """Which model answers, and how it is loaded."""

    GROUP = "model"

    model_name_or_path: str | None = config_field(
        None, "A merged model folder, or the base model of adapter_name_or_path. Required.", nullable=False)
    adapter_name_or_path: list[str] | None = config_field(
        None, "Adapter folder(s) (PEFT format) loaded onto the base model, comma list.")
    template: str | None = config_field(None, "Chat template (default: qwen3 for Qwen3 models, else qwen).")
    default_system: str | None = config_field(None, "System prompt (default: the template's).")
    enable_thinking: bool = config_field(True, "Thinking mode for reasoning templates (qwen3).")
    quantization_bit: Literal[4] | None = config_field(
        None, "Load the base in NF4 (as the QLoRA run that trained the adapter).")
    infer_dtype: Literal["auto", "float32", "bfloat16", "float16"] = config_field(
        "auto", "Weights dtype (auto: the model's config, float32 on CPU).")
    trust_remote_code: bool = config_field(False, "Allow the model folder's own Python code.")
    device: Literal["auto", "cpu", "cuda", "npu"] = config_field("auto", "Where to run.", own=True)


@dataclass
class ChatArguments(GeneratingArguments, ChatModelArguments):
    """Everything ``npu-ft chat`` reads."""
