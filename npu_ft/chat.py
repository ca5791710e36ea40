"""``npu-ft chat``: talk to a fine-tuned model with the template it was trained with.

    npu-ft chat MODEL_DIR [--adapter DIR[,DIR]] [--prompt TEXT] [options] [key=value ...]
    npu-ft chat CHAT.yaml [--prompt TEXT] [key=value ...]     # LLaMA-Factory inference keys

Interactive by default (answers stream as they are generated; ``clear`` forgets the conversation,
``exit`` quits); with ``--prompt`` it prints one answer and exits, for scripts. Keys and defaults
are LLaMA-Factory's (:class:`~npu_ft.config.chat_args.ChatArguments`); options are shortcuts for them.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from npu_ft.cli_common import DEVICE_CHOICES, positive_float, positive_int, report

__all__ = ["ChatModel", "chat_main", "load_chat_arguments"]


class ChatError(ValueError):
    """A chat setup that cannot work (names the file, key or folder)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="npu-ft chat", description="Chat with a fine-tuned model (streaming), or answer "
                                "one --prompt and exit.")
    p.add_argument("path", help="a model folder (merged model or base model), or a chat YAML")
    p.add_argument("overrides", nargs="*", help="key=value (LLaMA-Factory inference keys)")
    p.add_argument("--adapter", help="adapter folder(s), comma separated (adapter_name_or_path)")
    p.add_argument("--template", help="chat template: qwen, qwen3, qwen3_nothink (default: from the model)")
    p.add_argument("--system", help="system prompt (default_system)")
    p.add_argument("--device", choices=DEVICE_CHOICES, help="where to run (default: $NPU_FT_DEVICE or auto)")
    p.add_argument("--quantization-bit", type=int, choices=(4,), help="load the base in NF4 (QLoRA adapters)")
    p.add_argument("--max-new-tokens", type=positive_int)
    p.add_argument("--temperature", type=positive_float)
    p.add_argument("--top-p", type=positive_float)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample=false)")
    p.add_argument("--prompt", help="answer this one message and exit")
    return p


_FLAG_KEYS = {"adapter": "adapter_name_or_path", "template": "template", "system": "default_system",
              "device": "device", "quantization_bit": "quantization_bit", "max_new_tokens": "max_new_tokens",
              "temperature": "temperature", "top_p": "top_p"}


def load_chat_arguments(args: argparse.Namespace):
    """:class:`ChatArguments` from a model folder or YAML file, ``key=value`` overrides and flags."""
    from npu_ft.config import OPTIONS, parse_overrides
    from npu_ft.config.chat_args import ChatArguments
    from npu_ft.config.schema import ConfigError, field_infos, parse_fields
    from npu_ft.config.yaml_io import YamlError, load_yaml_mapping

    path = Path(args.path)
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path.is_file():
        try:
            data = load_yaml_mapping(path)
        except YamlError as exc:
            raise ChatError(str(exc)) from None
        chat_keys = field_infos(ChatArguments)
        for key, value in data.items():
            if key in chat_keys or key not in OPTIONS:  # a training recipe's other keys: not chat's business
                raw[key], sources[key] = value, str(path)
    elif path.is_dir():
        raw["model_name_or_path"], sources["model_name_or_path"] = str(path), "command line"
    else:
        raise ChatError(f"{path}: no such model folder or chat YAML")
    for key, value, text in parse_overrides(args.overrides):
        raw[key], sources[key] = value, f"command-line override '{text}'"
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            raw[key], sources[key] = value, f"--{flag.replace('_', '-')}"
    if args.greedy:
        raw["do_sample"], sources["do_sample"] = False, "--greedy"
    try:
        values = parse_fields(ChatArguments, raw, str(path), sources,
                              unknown=" (not a chat key: model, adapter, template or generation settings)")
        chat = ChatArguments(**values)
    except ConfigError as exc:
        raise ChatError(str(exc)) from None
    if not chat.model_name_or_path:
        raise ChatError(f"{path}: key 'model_name_or_path' is required")
    for adapter in chat.adapter_name_or_path or []:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ChatError(f"{sources.get('adapter_name_or_path', path)}: key 'adapter_name_or_path': {adapter!r} is "
                            "not an adapter folder (no adapter_config.json)")
    return chat


class ChatModel:
    """A model, its tokenizer and template, ready to answer conversations."""

    def __init__(self, chat) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from npu_ft.data.templates import fix_tokenizer_for_template, get_template
        from npu_ft.device import select_device
        from npu_ft.model.loading import load_model, load_tokenizer, resolve_dtype, resolve_model_path
        from npu_ft.train.adapter_io import load_adapter, read_adapter_config

        hf_logging.disable_progress_bar()  # the weight-loading bar is noise in a chat
        folder = resolve_model_path(chat.model_name_or_path)
        backend, device = select_device(None if chat.device == "auto" else chat.device)
        dtype = torch.float32 if chat.infer_dtype == "auto" and device.type == "cpu" else (
            None if chat.infer_dtype == "auto" else resolve_dtype(chat.infer_dtype))
        model = load_model({"model_name_or_path": str(folder), "trust_remote_code": chat.trust_remote_code},
                           device=None, dtype=dtype or _config_dtype(folder))
        for adapter in chat.adapter_name_or_path or []:
            if chat.quantization_bit == 4:
                from npu_ft.modules.inject import apply_qlora

                config = read_adapter_config(adapter)
                apply_qlora(model, list(config["target_modules"]), r=int(config["r"]),
                            alpha=config.get("lora_alpha", 8), use_rslora=bool(config.get("use_rslora")),
                            additional_target=config.get("modules_to_save"))
            load_adapter(model, adapter, strict=True)
        self.model = model.to(device).eval()
        self.device = device
        self.tokenizer = load_tokenizer(folder, chat.trust_remote_code)
        name = chat.template or ("qwen3" if getattr(model.config, "model_type", "") == "qwen3" else "qwen")
        self.template = get_template(name, chat.default_system, chat.enable_thinking)
        fix_tokenizer_for_template(self.template, self.tokenizer)
        self.chat = chat
        self.stop_ids = [self.tokenizer.convert_tokens_to_ids(w) for w in self.template.stop_words]

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Text pieces of the answer to ``messages`` (the last one is the user's), as generated."""
        import torch
        from transformers import TextIteratorStreamer

        from npu_ft.data.unsupervised import encode_prompt

        prompt, _ = encode_prompt(messages, self.template, self.tokenizer, self.chat.default_system)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=self.chat.skip_special_tokens)
        ids = torch.tensor([prompt], device=self.device)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                      eos_token_id=[*self.stop_ids, self.tokenizer.eos_token_id],
                      pad_token_id=self.tokenizer.pad_token_id, **self.chat.generation_kwargs())
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if failure:
            raise failure[0]

    def answer(self, messages: list[dict[str, str]]) -> str:
        return "".join(self.stream(messages))


def _config_dtype(folder: Path):
    import json

    import torch

    from npu_ft.model.loading import resolve_dtype

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    try:
        return resolve_dtype(str(config.get("dtype") or config.get("torch_dtype") or "float32"))
    except ValueError:
        return torch.float32


def _interactive(model: ChatModel) -> int:
    print("npu-ft chat: type a message; 'clear' forgets the conversation, 'exit' quits.", file=sys.stderr)
    messages: list[dict[str, str]] = []
    while True:
        try:
            text = input("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.strip() == "exit":
            return 0
        if text.strip() == "clear":
            messages = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        print("Assistant: ", end="", flush=True)
        pieces = []
        for piece in model.stream(messages):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})


def chat_main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    from npu_ft.device import DeviceUnavailableError
    from npu_ft.model.loading import ModelLoadError

    try:
        chat = load_chat_arguments(args)
        model = ChatModel(chat)
    except (ChatError, ModelLoadError, DeviceUnavailableError, FileNotFoundError, ValueError) as exc:
        return report("npu-ft chat", exc)
    if args.prompt is not None:
        for piece in model.stream([{"role": "user", "content": args.prompt}]):
            print(piece, end="", flush=True)
        print()
        return 0
    return _interactive(model)
