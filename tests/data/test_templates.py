from __future__ import annotations

import json

import pytest

from npu_ft.data.templates import get_template

QWEN_SYS = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


def _texts(tok, pairs):
    return [(tok.decode(s), tok.decode(t)) for s, t in pairs]


def _msgs(*contents):
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]


def test_qwen_default_system_and_slots(qwen_tok):
    tpl = get_template("qwen")
    pairs = tpl.encode_multiturn(qwen_tok, _msgs("Hi", "Hello!", "Bye", "Ciao"))
    assert _texts(qwen_tok, pairs) == [
        (QWEN_SYS + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello!<|im_end|>\n"),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", "Ciao<|im_end|>\n"),
    ]
    assert pairs[0][1][-2:] == [151645, 198]


def test_qwen_slots_tokenized_separately(qwen_tok):
    tpl = get_template("qwen")
    # content ending in "\n" would merge with the slot's own "\n" if tokenized together
    (source, target), = tpl.encode_multiturn(qwen_tok, _msgs("line\n", "ok\n"), system="S")
    expect = []
    for text in ["<|im_start|>system\nS<|im_end|>\n", "<|im_start|>user\nline\n<|im_end|>\n<|im_start|>assistant\n"]:
        expect += qwen_tok.encode(text, add_special_tokens=False)
    assert source == expect
    assert target == qwen_tok.encode("ok\n<|im_end|>\n", add_special_tokens=False)


def test_recipe_default_system(qwen_tok):
    tpl = get_template("qwen", default_system="Custom.")
    (source, _), = tpl.encode_multiturn(qwen_tok, _msgs("Hi", "Yo"))
    assert qwen_tok.decode(source).startswith("<|im_start|>system\nCustom.<|im_end|>\n")
    (source, _), = tpl.encode_multiturn(qwen_tok, _msgs("Hi", "Yo"), system="Own")
    assert qwen_tok.decode(source).startswith("<|im_start|>system\nOwn<|im_end|>\n")


def test_qwen3_no_default_system_and_empty_thought(qwen3_tok):
    tpl = get_template("qwen3")
    pairs = tpl.encode_multiturn(qwen3_tok, _msgs("Hi", "Hello", "Q", "<think>\nx\n</think>\n\nA"))
    assert _texts(qwen3_tok, pairs) == [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<think>\n\n</think>\n\nHello<|im_end|>\n"),
        ("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", "<think>\nx\n</think>\n\nA<|im_end|>\n"),
    ]
    assert pairs[0][1][:4] == [151667, 271, 151668, 271]


def test_qwen3_enable_thinking_false(qwen3_tok):
    tpl = get_template("qwen3", enable_thinking=False)
    pairs = tpl.encode_multiturn(qwen3_tok, _msgs("Q", "<think>\nx\n</think>\n\nA"))
    assert _texts(qwen3_tok, pairs) == [
        ("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", "A<|im_end|>\n"),
    ]


def test_qwen3_discard_history_thoughts(qwen3_tok):
    tpl = get_template("qwen3")
    msgs = _msgs("Q1", "<think>\nt1\n</think>\n\nA1", "Q2", "A2")
    pairs = tpl.encode_multiturn(qwen3_tok, msgs, discard_history_thoughts=True)
    assert [t for _, t in _texts(qwen3_tok, pairs)] == ["A1<|im_end|>\n", "<think>\n\n</think>\n\nA2<|im_end|>\n"]
    kept = get_template("qwen3", preserve_thinking=True)
    pairs = kept.encode_multiturn(qwen3_tok, msgs, discard_history_thoughts=False)
    assert qwen3_tok.decode(pairs[0][1]) == "<think>\nt1\n</think>\n\nA1<|im_end|>\n"


def test_qwen3_nothink_plain(qwen3_tok):
    tpl = get_template("qwen3_nothink")
    (s, t), = tpl.encode_multiturn(qwen3_tok, _msgs("Q", "A"))
    assert (
        qwen3_tok.decode(s) + qwen3_tok.decode(t)
        == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )


def test_qwen_tools_function_observation(qwen_tok):
    tpl = get_template("qwen")
    tools = json.dumps([{"name": "f", "description": "d", "parameters": {}}])
    msgs = [
        {"role": "user", "content": "call f"},
        {"role": "function", "content": json.dumps({"name": "f", "arguments": {"x": 1}})},
        {"role": "observation", "content": "42"},
        {"role": "assistant", "content": "done"},
    ]
    pairs = _texts(qwen_tok, tpl.encode_multiturn(qwen_tok, msgs, system="", tools=tools))
    assert "# Tools" in pairs[0][0] and '{"type": "function", "function": {"name": "f"' in pairs[0][0]
    assert pairs[0][1] == '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n'
    assert pairs[1][0] == "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_unknown_template():
    with pytest.raises(ValueError, match="llama3"):
        get_template("llama3")
    with pytest.raises(ValueError, match="required"):
        get_template(None)
