"""``npu-ft chat``: one answer with --prompt (the real console script), greedy answers equal to
generating from the same prompt ids, an adapter changes the answer like merging it does, and bad
input is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from npu_ft.chat import ChatModel, _parser, load_chat_arguments
from npu_ft.data.templates import get_template
from npu_ft.data.unsupervised import encode_prompt

from ..train._sft_helpers import tiny_model_dir

MESSAGE = "Reverse the digits.\n1234"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A LoRA adapter with non-zero B (so it changes the answers), saved in PEFT format."""
    from npu_ft.model.loading import load_model
    from npu_ft.modules.inject import apply_lora, lora_modules
    from npu_ft.train.adapter_io import save_adapter

    model = load_model(str(model_dir), dtype="float32")
    apply_lora(model, "all", r=4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * 0.5)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    save_adapter(model, out, base_model_name_or_path=str(model_dir))
    return out


def _chat(*argv: str) -> ChatModel:
    return ChatModel(load_chat_arguments(_parser().parse_intermixed_args(list(argv))))


def _greedy(model, tokenizer, prompt: list[int], n: int) -> str:
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=[151645, tokenizer.eos_token_id])
    return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


def test_greedy_answer_is_the_template_prompt_continued(model_dir):
    chat = _chat(str(model_dir), "--greedy", "--max-new-tokens", "6", "--device", "cpu")
    answer = chat.answer([{"role": "user", "content": MESSAGE}])
    prompt, _ = encode_prompt([{"role": "user", "content": MESSAGE}], get_template("qwen"), chat.tokenizer)
    assert prompt[-3:] == chat.tokenizer.encode("<|im_start|>assistant\n")  # generation starts after the header
    assert answer == _greedy(chat.model, chat.tokenizer, prompt, 6)


def test_adapter_changes_the_answer_like_the_merged_model(model_dir, adapter_dir):
    from npu_ft.modules.inject import merge_adapter

    base = _chat(str(model_dir), "--greedy", "--max-new-tokens", "8", "--device", "cpu")
    adapted = _chat(str(model_dir), "--adapter", str(adapter_dir), "--greedy", "--max-new-tokens", "8",
                    "--device", "cpu")
    messages = [{"role": "user", "content": MESSAGE}]
    prompt, _ = encode_prompt(messages, get_template("qwen"), adapted.tokenizer)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        assert not torch.allclose(base.model(ids).logits, adapted.model(ids).logits)
    merged = merge_adapter(adapted.model)
    assert adapted.answer(messages) == _greedy(merged, adapted.tokenizer, prompt, 8)


def test_console_script_prompt_prints_one_answer(model_dir, tmp_path):
    recipe = tmp_path / "chat.yaml"
    recipe.write_text(f"model_name_or_path: {model_dir}\ntemplate: qwen\ndo_sample: false\nmax_new_tokens: 5\n"
                      "output_dir: ignored/by/chat\n")
    proc = subprocess.run([sys.executable, "-m", "npu_ft.cli", "chat", str(recipe), "--prompt", MESSAGE,
                           "--device", "cpu"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    chat = _chat(str(recipe), "--device", "cpu")
    assert proc.stdout == chat.answer([{"role": "user", "content": MESSAGE}]) + "\n"


@pytest.mark.parametrize("argv, words", [
    (["/no/such/folder", "--prompt", "hi"], "no such model folder or chat YAML"),
    (["{model}", "lora_rnak=3", "--prompt", "hi"], "unknown key 'lora_rnak'"),
    (["{model}", "temperature=hot", "--prompt", "hi"], "key 'temperature'"),
    (["{model}", "--adapter", "/no/adapter", "--prompt", "hi"], "/no/adapter"),
])
def test_bad_input_is_one_line(model_dir, capsys, argv, words):
    from npu_ft.cli import main

    code = main(["chat", *[a.format(model=model_dir) for a in argv]])
    err = capsys.readouterr().err
    assert code == 1 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
