"""Writes the demo datasets in ``data/`` (made for npu-ft; deterministic, so the committed files can be
regenerated and checked):

    python scripts/make_demo_data.py          # data/dataset_info.json + the files it names

``alpaca_en_demo`` / ``alpaca_zh_demo`` (alpaca format) and ``sharegpt_demo`` (multi-turn sharegpt),
each a few hundred small tasks with checkable answers: arithmetic, unit conversions, string and list
operations and a small glossary. The shipped Qwen recipes train on ``alpaca_en_demo``.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data"
SEED = 20261202

GLOSSARY = {
    "a prime number": "A whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, 5 and 7.",
    "an even number": "A whole number that can be divided by 2 with no remainder, such as 4, 10 or 36.",
    "a fraction": "A number written as one whole number over another, like 3/4, meaning 3 parts out of 4.",
    "a palindrome": "A word or phrase that reads the same backwards as forwards, such as 'level' or 'noon'.",
    "an acronym": "A word made from the first letters of other words, for example 'NPU' for neural processing unit.",
    "a learning rate": "The size of the step an optimizer takes along the gradient when it updates the weights.",
    "a tokenizer": "The program that splits text into tokens, the units a language model reads and writes.",
    "gradient checkpointing": "Keeping fewer activations during the forward pass and recomputing them in the "
                              "backward pass, trading compute for memory.",
    "LoRA": "Low-rank adaptation: a frozen weight W is adapted by adding a small trainable product B A, "
            "so only A and B are trained.",
    "a batch": "A group of training examples processed together in one forward and backward pass.",
    "an epoch": "One full pass of training over every example of the dataset.",
    "overfitting": "When a model learns its training examples so closely that it does worse on new examples.",
    "a checkpoint": "A saved copy of a model's weights and training state, from which training can resume.",
    "quantization": "Storing numbers with fewer bits, for example weights in 4-bit NF4 instead of 16-bit floats.",
    "a median": "The middle value of a sorted list of numbers (the mean of the two middle ones for an even count).",
}

GLOSSARY_ZH = {
    "质数": "大于 1 且只能被 1 和它本身整除的整数，例如 2、3、5、7。",
    "偶数": "能被 2 整除的整数，例如 4、10、36。",
    "分数": "用一个整数除以另一个整数表示的数，例如 3/4 表示四份中的三份。",
    "回文": "正着读和倒着读都一样的词语或句子，例如“上海自来水来自海上”。",
    "学习率": "优化器沿梯度方向更新权重时每一步的大小。",
    "检查点": "保存下来的模型权重和训练状态，训练可以从这里继续。",
    "量化": "用更少的比特存储数字，例如用 4 比特的 NF4 存储权重。",
    "过拟合": "模型把训练样本记得太死，在新样本上反而表现更差。",
}

UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
         ("hours", "minutes", 60), ("minutes", "seconds", 60), ("liters", "milliliters", 1000)]
UNITS_ZH = [("千米", "米", 1000), ("米", "厘米", 100), ("千克", "克", 1000), ("小时", "分钟", 60), ("升", "毫升", 1000)]
WORDS = ["planet", "garden", "window", "silver", "rocket", "orange", "pencil", "harbor", "tunnel", "meadow",
         "lantern", "compass", "violin", "thunder", "canyon", "marble", "velvet", "glacier", "falcon", "harvest"]
SENTENCES = ["the train leaves at nine", "fine-tuning needs good data", "small models learn fast",
             "every answer can be checked", "the river runs to the sea", "cards with more memory cost more"]


def _arith(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(2, 99), r.randint(2, 99)
    op, sym, val = r.choice([("plus", "+", a + b), ("minus", "-", a - b), ("times", "×", a * b)])
    return f"What is {a} {op} {b}?", "", f"{a} {sym} {b} = {val}."


def _units(r: random.Random) -> tuple[str, str, str]:
    big, small, factor = r.choice(UNITS)
    n = r.randint(2, 12)
    return f"Convert {n} {big} to {small}.", "", f"{n} {big} is {n * factor} {small}."


def _reverse(r: random.Random) -> tuple[str, str, str]:
    word = r.choice(WORDS)
    return "Reverse the letters of the word.", word, word[::-1]


def _vowels(r: random.Random) -> tuple[str, str, str]:
    word = r.choice(WORDS)
    n = sum(c in "aeiou" for c in word)
    return f"How many vowels are in the word '{word}'?", "", f"There {'is' if n == 1 else 'are'} {n} " \
        f"vowel{'' if n == 1 else 's'} in '{word}'."


def _sort(r: random.Random) -> tuple[str, str, str]:
    nums = r.sample(range(1, 100), r.randint(3, 7))
    return "Sort these numbers in ascending order.", ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))


def _upper(r: random.Random) -> tuple[str, str, str]:
    s = r.choice(SENTENCES)
    return "Rewrite the sentence in capital letters.", s, s.upper()


def _parity(r: random.Random) -> tuple[str, str, str]:
    n = r.randint(1, 500)
    return f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def _multiples(r: random.Random) -> tuple[str, str, str]:
    n, k = r.randint(2, 12), r.randint(3, 6)
    return f"List the first {k} multiples of {n}.", "", ", ".join(str(n * i) for i in range(1, k + 1))


def _define(r: random.Random) -> tuple[str, str, str]:
    term = r.choice(sorted(GLOSSARY))
    return f"Explain what {term} is in one sentence.", "", GLOSSARY[term]


def _median(r: random.Random) -> tuple[str, str, str]:
    nums = sorted(r.sample(range(1, 60), r.choice((3, 5, 7))))
    r.shuffle(nums)
    return "Find the median of these numbers.", " ".join(map(str, nums)), \
        f"Sorted: {' '.join(map(str, sorted(nums)))}. The median is {sorted(nums)[len(nums) // 2]}."


TASKS_EN: list[Callable[[random.Random], tuple[str, str, str]]] = [
    _arith, _units, _reverse, _vowels, _sort, _upper, _parity, _multiples, _define, _median]


def _arith_zh(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(2, 99), r.randint(2, 99)
    op, sym, val = r.choice([("加", "+", a + b), ("减", "-", a - b), ("乘以", "×", a * b)])
    return f"{a} {op} {b} 等于多少？", "", f"{a} {sym} {b} = {val}。"


def _units_zh(r: random.Random) -> tuple[str, str, str]:
    big, small, factor = r.choice(UNITS_ZH)
    n = r.randint(2, 12)
    return f"把 {n} {big}换算成{small}。", "", f"{n} {big}等于 {n * factor} {small}。"


def _parity_zh(r: random.Random) -> tuple[str, str, str]:
    n = r.randint(1, 500)
    return f"{n} 是奇数还是偶数？", "", f"{n} 是{'偶数' if n % 2 == 0 else '奇数'}。"


def _define_zh(r: random.Random) -> tuple[str, str, str]:
    term = r.choice(sorted(GLOSSARY_ZH))
    return f"用一句话解释什么是{term}。", "", GLOSSARY_ZH[term]


def _sort_zh(r: random.Random) -> tuple[str, str, str]:
    nums = r.sample(range(1, 100), r.randint(3, 6))
    return "把下面的数字从小到大排序。", "、".join(map(str, nums)), "、".join(map(str, sorted(nums)))


TASKS_ZH = [_arith_zh, _units_zh, _parity_zh, _define_zh, _sort_zh]


def alpaca(tasks, n: int, r: random.Random) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        instruction, query, output = tasks[i % len(tasks)](r)
        rows.append({"instruction": instruction, "input": query, "output": output})
    return rows


def sharegpt(n: int, r: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        a, b, c = r.randint(2, 30), r.randint(2, 30), r.randint(2, 9)
        turns = [("human", f"What is {a} times {b}?"), ("gpt", f"{a} × {b} = {a * b}."),
                 ("human", f"And if you add {c}?"), ("gpt", f"{a * b} + {c} = {a * b + c}.")]
        if i % 3 == 0:
            word = r.choice(WORDS)
            turns += [("human", f"Now spell '{word}' backwards."), ("gpt", word[::-1])]
        row: dict = {"conversations": [{"from": who, "value": text} for who, text in turns]}
        if i % 4 == 0:
            row["system"] = "You are a careful assistant. Answer briefly and show the calculation."
        rows.append(row)
    return rows


def build() -> dict[str, bytes]:
    """``{file name: bytes}`` of every demo file."""
    r = random.Random(SEED)
    files = {
        "alpaca_en_demo.json": alpaca(TASKS_EN, 300, r),
        "alpaca_zh_demo.json": alpaca(TASKS_ZH, 150, r),
        "sharegpt_demo.json": sharegpt(120, r),
    }
    info = {
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"},
        "sharegpt_demo": {"file_name": "sharegpt_demo.json", "formatting": "sharegpt",
                          "columns": {"messages": "conversations", "system": "system"}},
    }
    out = {name: (json.dumps(rows, ensure_ascii=False, indent=1) + "\n").encode() for name, rows in files.items()}
    out["dataset_info.json"] = (json.dumps(info, indent=2) + "\n").encode()
    return out


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, data in build().items():
        (OUT / name).write_bytes(data)
        print(f"wrote {OUT / name} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
