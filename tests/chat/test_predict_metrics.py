"""Prediction prompts (LLaMA-Factory's unsupervised processor) and BLEU/ROUGE as LLaMA-Factory computes them."""

from __future__ import annotations

import json

import pytest

from npu_ft.data.converters import ConvertedExample
from npu_ft.data.templates import get_template
from npu_ft.data.unsupervised import encode_prompt, process_unsupervised
from npu_ft.train.metrics import average_similarity, similarity

pytest.importorskip("rouge_chinese", reason="the metrics extra is part of the test install")


def test_identical_and_disjoint_answers():
    assert similarity("the cat sat", "the cat sat") == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0,
                                                         "bleu-4": 100.0}
    empty = similarity("", "something")
    assert empty["rouge-1"] == empty["rouge-2"] == empty["rouge-l"] == 0.0


def test_bleu_is_character_level_with_smoothing_3():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    predict, label = "今天天气很好", "今天天气不错"
    expected = round(sentence_bleu([list(label)], list(predict), smoothing_function=SmoothingFunction().method3)
                     * 100, 4)
    assert similarity(predict, label)["bleu-4"] == expected
    assert 0 < expected < 100


def test_average_is_the_mean_of_examples():
    a, b = similarity("a b c", "a b c"), similarity("x y", "a b")
    avg = average_similarity(["a b c", "x y"], ["a b c", "a b"])
    assert avg == {k: (a[k] + b[k]) / 2 for k in avg}
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        average_similarity(["a", "b"], ["a"])


def test_prompt_ends_with_the_assistant_header_and_label_is_the_answer(qwen_tok):
    template = get_template("qwen")
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    prompt, label = encode_prompt(messages, template, qwen_tok)
    text = qwen_tok.decode(prompt)
    assert text.endswith("<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n") and "A1<|im_end|>" in text
    assert qwen_tok.decode(label) == "A2<|im_end|>\n"
    open_prompt, open_label = encode_prompt(messages[:3], template, qwen_tok)
    # an open conversation gets an empty answer slot, as LLaMA-Factory encodes it: only the end tokens
    assert open_prompt == prompt and qwen_tok.decode(open_label) == "<|im_end|>\n"
    short, short_label = encode_prompt(messages, template, qwen_tok, cutoff_len=10)
    assert len(short) + len(short_label) <= 10


def test_process_unsupervised_keeps_prompt_and_label(qwen_tok):
    ex = ConvertedExample(prompt=[{"role": "user", "content": "hi"}], response=[{"role": "assistant",
                                                                                 "content": "hello"}])
    bad = ConvertedExample(prompt=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    items = process_unsupervised([ex, bad], get_template("qwen"), qwen_tok, 64)
    assert len(items) == 1 and qwen_tok.decode(items[0]["labels"]) == "hello<|im_end|>\n"
    assert json.dumps(items)  # plain lists, writable as JSON


def test_predict_and_score_writes_llamafactory_predictions(tmp_path, qwen_tok):
    import torch

    from npu_ft.model.tiny import model_from_config, tiny_config
    from npu_ft.train.predict import PREDICTIONS_FILE, generate_answers, predict_and_score

    model = model_from_config(tiny_config("qwen2"), seed=0)
    examples = [ConvertedExample(prompt=[{"role": "user", "content": q}], response=[{"role": "assistant",
                                                                                     "content": a}])
                for q, a in (("2+2?", "4"), ("Name a colour, please.", "red"), ("hi", "hello"))]
    items = process_unsupervised(examples, get_template("qwen"), qwen_tok, 64)
    generation = {"do_sample": False, "max_new_tokens": 4}
    metrics = predict_and_score(model, qwen_tok, items, str(tmp_path), generation, batch_size=2,
                                stop_token_ids=[151645])
    lines = [json.loads(line) for line in (tmp_path / PREDICTIONS_FILE).read_text().splitlines()]
    assert [set(line) for line in lines] == [{"prompt", "predict", "label"}] * 3
    # labels are the answer slot decoded without special tokens, "\n" after <|im_end|> kept (as LLaMA-Factory)
    assert [line["label"] for line in lines] == ["4\n", "red\n", "hello\n"]
    assert lines[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert set(metrics) >= {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"}
    # batched, left-padded generation gives what each prompt alone gives
    alone = [generate_answers(model, qwen_tok, [item["input_ids"]], generation, stop_token_ids=[151645])[0]
             for item in items]
    assert [qwen_tok.decode(a, skip_special_tokens=True) for a in alone] == [line["predict"] for line in lines]
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.is_grad_enabled()
