"""The offline Qwen tokenizer fixtures of the data tests, shared here."""

from tests.data.conftest import qwen_tok, qwen_tokenizers  # noqa: F401
