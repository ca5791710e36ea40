"""Errors in a second (issue #11): a config or data error, ``k8s``, ``env``, ``bench --list`` and
every ``--help`` cost at most 2x ``python -c "import torch"`` and print nothing that is not npu-ft's.

A ratio, measured side by side in this one test: each command and the torch import run in fresh
interpreters, interleaved round by round (so a load change hits both), and the medians of 3 runs
are compared. The command lines are ordinary user invocations of the real entry point.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest

from ._cli import HANG_S, ROOT, cli_env, foreign_lines

pytestmark = pytest.mark.slow

RATIO = 2.0
ROUNDS = 3
SUBCOMMANDS = ("train", "export", "bench", "doctor", "demo", "chat", "env", "k8s", "lf-train", "estimate", "plan")


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    from npu_ft.model.tiny import build_tiny_model
    from tests.launch._helpers import tiny_recipe, toy_dataset, write_yaml

    root = tmp_path_factory.mktemp("startup")
    model = build_tiny_model(root / "tiny", arch="qwen2", seed=0)
    data = toy_dataset(root / "data")
    (data / "dataset_info.json").write_text('{"toy": {"file_name": "gone.json"}}')
    recipe = tiny_recipe(model, data, root / "out")
    return {
        "root": root,
        "bad_key": write_yaml(root / "bad-key.yaml", {**recipe, "lora_rnak": 4}),
        "bad_data": write_yaml(root / "bad-data.yaml", recipe),
    }


def _cases(recipes) -> dict[str, list[str]]:
    """name -> npu-ft arguments."""
    missing = str(recipes["root"] / "missing.yaml")
    cases = {
        "train missing.yaml": ["train", missing],
        "train bad-key.yaml": ["train", str(recipes["bad_key"])],
        "train (missing data file)": ["train", str(recipes["bad_data"])],
        "k8s missing.yaml --image x": ["k8s", missing, "--image", "x"],
        "env": ["env"],
        "bench --list": ["bench", "--list", str(ROOT / "bench" / "suites" / "smoke.yaml")],
        "--help": ["--help"],
    }
    cases.update({f"{name} --help": [name, "--help"] for name in SUBCOMMANDS})
    return cases


def _timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=cli_env(), cwd=str(ROOT), capture_output=True, text=True, timeout=HANG_S)
    return time.perf_counter() - start, proc


def test_errors_and_help_cost_about_an_import_of_torch(recipes):
    cases = _cases(recipes)
    times: dict[str, list[float]] = {name: [] for name in ["import torch", *cases]}
    outputs: dict[str, subprocess.CompletedProcess] = {}
    for _ in range(ROUNDS):
        seconds, proc = _timed([sys.executable, "-c", "import torch"])
        assert proc.returncode == 0, proc.stderr
        times["import torch"].append(seconds)
        for name, args in cases.items():
            seconds, outputs[name] = _timed([sys.executable, "-m", "npu_ft.cli", *args])
            times[name].append(seconds)
    torch_s = statistics.median(times["import torch"])
    lines, slow, noisy = [f"import torch: {torch_s:.2f} s (median of {ROUNDS})"], {}, {}
    for name, args in cases.items():
        proc, ratio = outputs[name], statistics.median(times[name]) / torch_s
        lines.append(f"{name}: {statistics.median(times[name]):.2f} s = {ratio:.2f}x (exit {proc.returncode})")
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
        if proc.returncode == 0:
            assert proc.stdout.strip(), name
            others = proc.stderr.splitlines()  # a success prints nothing on stderr
        else:  # the exit codes and messages are tests/cli/test_faults_table.py's business
            assert any(line.startswith(f"npu-ft {args[0]}") for line in proc.stderr.splitlines()), (name, proc.stderr)
            others = foreign_lines(proc.stderr)
        if ratio > RATIO:
            slow[name] = ratio
        if others:
            noisy[name] = others[:2]
    report = "\n".join(lines)
    print(report)
    assert not slow and not noisy, f"slower than {RATIO}x import torch or printing foreign lines: " \
                                   f"{sorted(slow)}\n{report}\nforeign: {noisy}"
