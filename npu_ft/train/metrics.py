"""BLEU-4 and ROUGE-1/2/L of generated answers, computed as LLaMA-Factory computes them (for Chinese
and English alike): words from ``jieba``, ROUGE F-scores from ``rouge-chinese`` over the words,
BLEU-4 from ``nltk`` over characters with smoothing method 3; each in percent, per example, then
averaged. The packages are the ``metrics`` extra (``pip install "npu-ft[metrics]"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

__all__ = ["MetricsUnavailableError", "average_similarity", "similarity"]

METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


class MetricsUnavailableError(ImportError):
    """jieba / nltk / rouge-chinese are not installed."""


def _libraries():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as exc:
        raise MetricsUnavailableError(
            f"BLEU/ROUGE need the metrics extra ({exc.name} is missing): pip install \"npu-ft[metrics]\"") from None
    jieba.setLogLevel(logging.CRITICAL)
    return jieba, SmoothingFunction, sentence_bleu, Rouge


def similarity(predict: str, label: str) -> dict[str, float]:
    """``{"bleu-4", "rouge-1", "rouge-2", "rouge-l"}`` of one answer against its label, in percent."""
    jieba, smoothing, sentence_bleu, rouge = _libraries()
    hypothesis = list(jieba.cut(predict))
    reference = list(jieba.cut(label))
    scores: dict[str, float] = {}
    if not " ".join(hypothesis).split() or not " ".join(reference).split():
        scores.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    else:
        result = rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        scores.update({name: round(value["f"] * 100, 4) for name, value in result.items()})
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=smoothing().method3)
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return scores


def average_similarity(predicts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """The mean of :func:`similarity` over the pairs (each metric in percent)."""
    if len(predicts) != len(labels):
        raise ValueError(f"{len(predicts)} predictions for {len(labels)} labels")
    if not predicts:
        return {name: 0.0 for name in METRIC_NAMES}
    totals = dict.fromkeys(METRIC_NAMES, 0.0)
    for predict, label in zip(predicts, labels, strict=True):
        for name, value in similarity(predict, label).items():
            totals[name] += value
    return {name: totals[name] / len(predicts) for name in METRIC_NAMES}
