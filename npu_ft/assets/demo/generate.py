"""Regenerate the demo dataset (deterministic): ``python npu_ft/assets/demo/generate.py``.

Short made-up sentences, ``The <adjective> <colour> <animal> <verb> <place>.``, and three
questions about each, so that the answer depends on *both* the instruction and the input:

* "Which animal is it?"       The grumpy blue fox sleeps by the river.  ->  fox
* "What color is it?"         ...                                        ->  blue
* "What does it do?"          ...                                        ->  sleeps

A tiny random-init model learns this in a few hundred steps: it has to find the word the question
asks for and map it to the answer token (" fox" inside the sentence is another token than "fox"
at the start of the answer), and the held-out file tests *generalisation*: every
held-out sentence is a word combination that never occurs in the training file (each word does).

Alpaca format (instruction / input / output), registered in ``dataset_info.json`` as
``npu_ft_demo`` (train) and ``npu_ft_demo_test`` (held out).
"""

import itertools
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANIMALS = ["cat", "dog", "fox", "horse", "rabbit", "bear", "owl", "duck", "goat", "mouse", "tiger", "sheep"]
COLORS = ["red", "blue", "green", "black", "white", "brown", "yellow", "grey", "orange", "pink"]
ADJECTIVES = ["happy", "friendly", "calm", "cheerful", "gentle", "lovely", "brave", "kind",
              "angry", "grumpy", "sad", "nasty", "lazy", "rude", "scared", "sick"]
VERBS = ["sleeps", "runs", "sits", "waits", "plays", "eats", "hides", "walks"]
PLACES = ["by the river", "in the garden", "near the barn", "under a tree", "on the hill",
          "behind the house", "in the snow", "at the gate"]
QUESTIONS = {
    "animal": "Which animal is it?",
    "color": "What color is it?",
    "verb": "What does it do?",
}
N_TRAIN, N_TEST = 2000, 60


def record(i: int, words: tuple[str, str, str, str, str]) -> dict:
    """The i-th record: questions rotate animal / color / verb."""
    animal, color, adjective, verb, place = words
    task = list(QUESTIONS)[i % len(QUESTIONS)]
    answer = {"animal": animal, "color": color, "verb": verb}[task]
    return {"instruction": QUESTIONS[task], "input": f"The {adjective} {color} {animal} {verb} {place}.",
            "output": answer}


def main() -> None:
    combos = list(itertools.product(ANIMALS, COLORS, ADJECTIVES, VERBS, PLACES))
    random.Random(1234).shuffle(combos)
    train = [record(i, c) for i, c in enumerate(combos[:N_TRAIN])]
    test = [record(i, c) for i, c in enumerate(combos[N_TRAIN:N_TRAIN + N_TEST])]
    for name, rows in (("demo_train.json", train), ("demo_test.json", test)):  # a JSON list, a record a line
        (HERE / name).write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    info = {
        "npu_ft_demo": {"file_name": "demo_train.json"},
        "npu_ft_demo_test": {"file_name": "demo_test.json"},
    }
    (HERE / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
