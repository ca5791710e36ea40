"""Prompts for generation (``do_predict``, ``npu-ft chat``): LLaMA-Factory's unsupervised processor.

An example becomes ``(prompt_ids, label_ids)``: the prompt is every earlier turn plus the last user
message with the assistant header (where generation starts); the label is the last response (empty
when the example has none). Both are cut to ``cutoff_len`` with :func:`~.supervised.infer_seqlen`.
"""

from __future__ import annotations

from typing import Any

from .converters import ConvertedExample, Role
from .supervised import infer_seqlen
from .templates import Template

__all__ = ["encode_prompt", "process_unsupervised"]


def encode_prompt(messages: list[dict[str, Any]], template: Template, tokenizer, system: str | None = None,
                  tools: str | None = None, cutoff_len: int | None = None) -> tuple[list[int], list[int]]:
    """``(prompt_ids, label_ids)`` for ``messages`` (alternating user/assistant, ending with a user
    message or with the assistant answer to compare against)."""
    if len(messages) % 2 == 1:
        messages = [*messages, {"role": Role.ASSISTANT, "content": ""}]
    turns = template.encode_multiturn(tokenizer, messages, system, tools)
    prompt = [t for source, target in turns[:-1] for t in source + target] + turns[-1][0]
    label = list(turns[-1][1])
    if template.efficient_eos:
        label.append(tokenizer.eos_token_id)
    if cutoff_len is not None:
        prompt_len, label_len = infer_seqlen(len(prompt), len(label), cutoff_len)
        prompt, label = prompt[:prompt_len], label[:label_len]
    return prompt, label


def process_unsupervised(examples: list[ConvertedExample], template: Template, tokenizer,
                         cutoff_len: int) -> list[dict[str, Any]]:
    """``{"input_ids", "attention_mask", "labels"}`` per example with a prompt: ``input_ids`` the
    prompt, ``labels`` the expected answer's ids (LLaMA-Factory's predict dataset)."""
    out = []
    for example in examples:
        if len(example.prompt) % 2 != 1 or len(example.response) > 1:
            continue
        prompt, label = encode_prompt(example.prompt + example.response, template, tokenizer, example.system,
                                      example.tools, cutoff_len)
        out.append({"input_ids": prompt, "attention_mask": [1] * len(prompt), "labels": label})
    return out
