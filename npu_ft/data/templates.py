"""Chat templates ``qwen``, ``qwen3`` and ``qwen3_nothink``, token for token as LLaMA-Factory 0.9.5.

A template turns a conversation into ``(source_ids, target_ids)`` pairs, one per user/assistant
turn. Each *slot* (system, user, assistant, ...) is formatted into a string and tokenized on its
own with ``add_special_tokens=False``, so token boundaries always fall between slots. The first
turn's source is the system slot followed by the user slot.

``qwen3`` is a reasoning template: an assistant message without ``<think>``/``</think>`` gets an
empty thought ``"<think>\\n\\n</think>\\n\\n"``; with ``enable_thinking`` (default) it is put in front
of the target (trained on), otherwise at the end of the source (not trained on). With
``enable_thinking=False`` existing thoughts are removed first; with ``mask_history`` (and not
``preserve_thinking``) thoughts of earlier turns are removed and only the last turn gets the empty
thought.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, replace
from typing import Any

from .converters import DataFormatError, Role

__all__ = ["Template", "TEMPLATES", "get_template", "fix_tokenizer_for_template"]

_QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}}\n</tool_call>"
)


def _fill(slot: str, **values: str) -> str:
    """Substitute ``{{name}}`` placeholders once each, in keyword order (LF's StringFormatter)."""
    for name, value in values.items():
        if not isinstance(value, str):
            raise DataFormatError(f"message content must be a string, got {value!r}")
        slot = slot.replace("{{" + name + "}}", value, 1)
    return slot


def _qwen_tools_text(tools: str) -> str:
    try:
        parsed = json.loads(tools)
    except (json.JSONDecodeError, TypeError) as err:
        raise DataFormatError(f"Invalid JSON format in tool description: {[tools]}.") from err
    if len(parsed) == 0:
        return ""
    text = ""
    for tool in parsed:
        wrapped = tool if tool.get("type") == "function" else {"type": "function", "function": tool}
        text += "\n" + json.dumps(wrapped, ensure_ascii=False)
    return _QWEN_TOOL_PROMPT.format(tool_text=text)


def _qwen_function_calls(calls_json: str, content: str) -> str:
    try:
        calls = json.loads(calls_json)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"Invalid JSON format in function message: {[content]}.") from err
    if not isinstance(calls, list):
        calls = [calls]
    texts = []
    for call in calls:
        # LF round-trips the arguments through a JSON string; the result is the same object.
        arguments = json.loads(json.dumps(call["arguments"], ensure_ascii=False))
        texts.append(json.dumps({"name": call["name"], "arguments": arguments}, ensure_ascii=False))
    return "\n".join(f"<tool_call>\n{t}\n</tool_call>" for t in texts)


@dataclass(frozen=True)
class Template:
    name: str
    user: str
    assistant: str
    system: str
    function: str
    observation: str
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")
    efficient_eos: bool = False
    replace_eos: bool = False
    reasoning: bool = False
    enable_thinking: bool | None = True
    preserve_thinking: bool = False

    # ---- configuration -------------------------------------------------------------------------
    def configured(
        self,
        default_system: str | None = None,
        enable_thinking: bool | None = True,
        preserve_thinking: bool = False,
    ) -> Template:
        """A copy with the recipe's ``default_system`` / thinking settings applied (as LF does)."""
        changes: dict[str, Any] = {}
        if default_system is not None:
            changes["default_system"] = default_system
        if self.reasoning:
            changes["enable_thinking"] = enable_thinking
            changes["preserve_thinking"] = preserve_thinking
        return replace(self, **changes)

    # ---- thoughts ------------------------------------------------------------------------------
    @property
    def empty_thought(self) -> str:
        return self.thought_words[0] + self.thought_words[1]

    def remove_thought(self, content: str) -> str:
        start, end = (re.escape(w) for w in self.thought_words)
        return re.sub(f"{start}(.*?){end}", "", content, flags=re.DOTALL).lstrip("\n")

    def _has_thought(self, content: str) -> bool:
        return self.thought_words[0].strip() in content or self.thought_words[1].strip() in content

    # ---- slots ---------------------------------------------------------------------------------
    def _function_text(self, content: str) -> str:
        start, end = (re.escape(w) for w in self.tool_call_words)
        call = re.search(f"{start}(.*?){end}", content, flags=re.DOTALL)
        if call is None:
            t_start, t_end = (re.escape(w) for w in self.thought_words)
            thought = re.search(f"{t_start}(.*?){t_end}", content, flags=re.DOTALL)
            json_part = content.replace(thought.group(0), "") if thought else content
            text = _qwen_function_calls(json_part, content)
            return (thought.group(0) + text) if thought else text
        rest = content.replace(call.group(0), "")
        return rest + _qwen_function_calls(call.group(1), content)

    def _message_slots(self, index: int, message: dict[str, Any], system: str, tools: str | None) -> list[str]:
        slots: list[str] = []
        if index == 0 and (system or tools):
            tool_text = _qwen_tools_text(tools) if tools else ""
            slots.append(_fill(self.system, content=system + tool_text))
        role, content = message["role"], message["content"]
        if role == Role.USER:
            slots.append(_fill(self.user, content=content, idx=str(index // 2)))
        elif role == Role.ASSISTANT:
            slots.append(_fill(self.assistant, content=content))
        elif role == Role.OBSERVATION:
            slots.append(_fill(self.observation, content=content))
        elif role == Role.FUNCTION:
            if not isinstance(content, str):
                raise DataFormatError(f"message content must be a string, got {content!r}")
            slots.append(_fill(self.function, content=self._function_text(content)))
        else:
            raise DataFormatError(f"Unexpected role: {role}")
        return slots

    def _encode_messages(self, tokenizer, messages, system, tools) -> list[list[int]]:
        system = system or self.default_system
        encoded = []
        for i, message in enumerate(messages):
            ids: list[int] = []
            for text in self._message_slots(i, message, system, tools):
                if text:
                    ids += tokenizer.encode(text, add_special_tokens=False)
            encoded.append(ids)
        return encoded

    # ---- public --------------------------------------------------------------------------------
    def encode_multiturn(
        self,
        tokenizer,
        messages: list[dict[str, Any]],
        system: str | None = None,
        tools: str | None = None,
        discard_history_thoughts: bool = False,
    ) -> list[tuple[list[int], list[int]]]:
        """``(source_ids, target_ids)`` per turn; ``messages`` alternate user-like/assistant-like."""
        if not self.reasoning:
            encoded = self._encode_messages(tokenizer, messages, system, tools)
            return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]

        messages = copy.deepcopy(messages)
        if self.enable_thinking is False:
            for i in range(1, len(messages), 2):
                messages[i]["content"] = self.remove_thought(messages[i]["content"])
        if discard_history_thoughts:
            for i in range(1, len(messages) - 2, 2):  # keep the last turn's thought
                messages[i]["content"] = self.remove_thought(messages[i]["content"])
        encoded = self._encode_messages(tokenizer, messages, system, tools)
        turns = [len(messages) - 2] if discard_history_thoughts else range(0, len(messages), 2)
        thought_ids = None
        for i in turns:
            if self._has_thought(messages[i + 1]["content"]):
                continue
            if thought_ids is None:
                thought_ids = tokenizer.encode(self.empty_thought, add_special_tokens=False)
            if self.enable_thinking:
                encoded[i + 1] = thought_ids + encoded[i + 1]  # learned
            else:
                encoded[i] = encoded[i] + thought_ids  # prompt side, not learned
        return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]


_CHATML = dict(
    user="<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{{content}}<|im_end|>\n",
    system="<|im_start|>system\n{{content}}<|im_end|>\n",
    function="{{content}}<|im_end|>\n",
    observation="<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    stop_words=("<|im_end|>",),
    replace_eos=True,
)

TEMPLATES: dict[str, Template] = {
    "qwen": Template(
        name="qwen",
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        **_CHATML,
    ),
    "qwen3": Template(name="qwen3", reasoning=True, **_CHATML),
    "qwen3_nothink": Template(name="qwen3_nothink", **_CHATML),
}


def get_template(
    name: str | None,
    default_system: str | None = None,
    enable_thinking: bool | None = True,
    preserve_thinking: bool = False,
) -> Template:
    """The named template with the recipe's settings applied."""
    if name is None:
        raise ValueError(f"`template` is required; supported: {sorted(TEMPLATES)}")
    if name not in TEMPLATES:
        raise ValueError(f"Template {name!r} is not supported by npu-ft; supported: {sorted(TEMPLATES)}")
    return TEMPLATES[name].configured(default_system, enable_thinking, preserve_thinking)


def fix_tokenizer_for_template(template: Template, tokenizer) -> None:
    """Make the tokenizer's eos the template's first stop word and give it a pad token (LF does
    this for ``replace_eos`` templates). A no-op for npu-ft's offline Qwen tokenizer."""
    if template.replace_eos and template.stop_words and tokenizer.eos_token != template.stop_words[0]:
        tokenizer.add_special_tokens({"eos_token": template.stop_words[0]})
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
