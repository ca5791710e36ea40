"""Regenerate the demo dataset (deterministic): ``python npu_ft/assets/demo/generate.py``.

Three digit-string tasks a tiny random-init model can learn in a few hundred steps, and that
test *generalisation*: the held-out strings never occur in the training file.

* "Repeat the digits."          4829 -> 4829
* "What is the first digit?"    4829 -> 4
* "What is the last digit?"     4829 -> 9

Alpaca format (instruction / input / output), registered in ``dataset_info.json`` as
``npu_ft_demo`` (train) and ``npu_ft_demo_test`` (held out).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = {
    "repeat": ("Repeat the digits.", lambda d: d),
    "first": ("What is the first digit?", lambda d: d[0]),
    "last": ("What is the last digit?", lambda d: d[-1]),
}
LENGTH = 4
N_TRAIN, N_TEST = 2000, 60


def main() -> None:
    rng = random.Random(1234)
    strings = rng.sample(range(10**LENGTH), N_TRAIN + N_TEST)
    strings = [str(s).zfill(LENGTH) for s in strings]
    names = list(TASKS)

    def record(i: int, s: str) -> dict:
        instruction, fn = TASKS[names[i % len(names)]]
        return {"instruction": instruction, "input": s, "output": fn(s)}

    train = [record(i, s) for i, s in enumerate(strings[:N_TRAIN])]
    test = [record(i, s) for i, s in enumerate(strings[N_TRAIN:])]
    (HERE / "demo_train.json").write_text(json.dumps(train, indent=1) + "\n")
    (HERE / "demo_test.json").write_text(json.dumps(test, indent=1) + "\n")
    info = {
        "npu_ft_demo": {"file_name": "demo_train.json"},
        "npu_ft_demo_test": {"file_name": "demo_test.json"},
    }
    (HERE / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
