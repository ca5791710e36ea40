"""Trainer callbacks: LLaMA-Factory's ``trainer_log.jsonl``, the NaN/inf loss guard, and the loss plot.

``trainer_log.jsonl`` (file name and fields as in LLaMA-Factory 0.9.5): one JSON object per logging
step, keys in this order, ``None`` values left out::

    {"current_steps": 5, "total_steps": 20, "loss": 2.31, "lr": 4.5e-05, "epoch": 0.25,
     "percentage": 25.0, "elapsed_time": "0:00:03", "remaining_time": "0:00:09"}

``eval_loss`` / ``predict_loss`` appear when an evaluation logged them; ``throughput`` (tokens/s since
the start of training) and ``total_tokens`` when the trainer counts input tokens. Times are
``str(timedelta(seconds=int(t)))``, i.e. "H:MM:SS". Unlike LLaMA-Factory we write each line
synchronously (and flush it) so that a run killed with SIGKILL keeps every line it logged.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import timedelta
from typing import Any

from transformers import TrainerCallback

TRAINER_LOG = "trainer_log.jsonl"

__all__ = [
    "LogCallback",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "TRAINER_LOG",
    "plot_loss",
    "smooth",
]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run was stopped before the optimizer applied it."""

    def __init__(self, step: int, value: float, last_checkpoint: str | None = None) -> None:
        self.step = step
        self.value = value
        self.last_checkpoint = last_checkpoint
        super().__init__(self._message())

    def _message(self) -> str:
        where = (
            f"the last good checkpoint is kept at {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint had been saved yet"
        )
        return (
            f"training loss is {self.value} at step {self.step}; training stopped before the optimizer "
            f"applied it ({where}). Lower learning_rate, check the data, or use fp32/bf16 instead of fp16."
        )

    def with_checkpoint(self, last_checkpoint: str | None) -> NonFiniteLossError:
        return NonFiniteLossError(self.step, self.value, last_checkpoint)


class NonFiniteLossGuard(TrainerCallback):
    """Stops training at the first NaN/inf loss.

    The trainer calls :meth:`check` with every micro-batch loss right after backward and before the
    optimizer step, so a bad step never reaches the weights; :meth:`check` raises
    :class:`NonFiniteLossError` naming the optimizer step (1-based, as in ``trainer_log.jsonl``).
    As a callback it also checks every logged loss (``on_log``), which covers training loops that do
    not go through our ``training_step`` (e.g. a plugin trainer).
    """

    def __init__(self) -> None:
        self.bad_step: int | None = None
        self.bad_value: float | None = None

    def check(self, loss_value: float, step: int) -> None:
        if not math.isfinite(loss_value):
            self.bad_step, self.bad_value = step, loss_value
            raise NonFiniteLossError(step, loss_value)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and logs["loss"] is not None:
            self.check(float(logs["loss"]), state.global_step)


class LogCallback(TrainerCallback):
    """Writes ``trainer_log.jsonl`` in LLaMA-Factory's format (see the module docstring)."""

    def __init__(self) -> None:
        self.start_time = 0.0
        self.max_steps = 0
        self.start_step = 0

    # -- helpers -----------------------------------------------------------------------------
    def _timing(self, cur_steps: int) -> tuple[str, str]:
        elapsed = time.time() - self.start_time
        done = cur_steps - self.start_step  # steps run by this process (resume starts later)
        per_step = elapsed / done if done > 0 else 0.0
        remaining = (self.max_steps - cur_steps) * per_step
        return str(timedelta(seconds=int(elapsed))), str(timedelta(seconds=int(remaining)))

    @staticmethod
    def _write(output_dir: str, logs: dict[str, Any]) -> None:
        with open(os.path.join(output_dir, TRAINER_LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(logs) + "\n")
            f.flush()

    # -- callback events ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        self.start_time = time.time()
        self.max_steps = state.max_steps
        self.start_step = state.global_step
        os.makedirs(args.output_dir, exist_ok=True)
        if state.global_step > 0:  # resumed: drop lines the interrupted run logged past the checkpoint
            _truncate_log(os.path.join(args.output_dir, TRAINER_LOG), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not args.should_save or not state.log_history:
            return
        last = state.log_history[-1]
        cur = state.global_step
        elapsed, remaining = self._timing(cur)
        record = dict(
            current_steps=cur,
            total_steps=self.max_steps,
            loss=last.get("loss"),
            eval_loss=last.get("eval_loss"),
            predict_loss=last.get("predict_loss"),
            lr=last.get("learning_rate"),
            epoch=last.get("epoch"),
            percentage=round(cur / self.max_steps * 100, 2) if self.max_steps != 0 else 100,
            elapsed_time=elapsed,
            remaining_time=remaining,
        )
        if state.num_input_tokens_seen:
            record["throughput"] = round(state.num_input_tokens_seen / max(time.time() - self.start_time, 1e-9), 2)
            record["total_tokens"] = state.num_input_tokens_seen
        record = {k: v for k, v in record.items() if v is not None}
        self._write(args.output_dir, record)


def _truncate_log(path: str, upto_step: int) -> None:
    """Keep only the lines with ``current_steps <= upto_step`` (atomically)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
            if int(rec.get("current_steps", 0)) <= upto_step:
                kept.append(json.dumps(rec) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def smooth(scalars: list[float]) -> list[float]:
    """TensorBoard-style EMA whose weight grows with the number of points (as LLaMA-Factory plots)."""
    if not scalars:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(scalars))) - 0.5)
    out, last = [], scalars[0]
    for value in scalars:
        last = last * weight + (1 - weight) * value
        out.append(last)
    return out


def plot_loss(output_dir: str, keys: tuple[str, ...] = ("loss", "eval_loss")) -> list[str]:
    """Plot ``trainer_state.json``'s log history to ``training_<key>.png``; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is an install requirement
        return []
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        history = json.load(f).get("log_history", [])
    written = []
    for key in keys:
        points = [(rec["step"], rec[key]) for rec in history if key in rec and "step" in rec]
        if not points:
            continue
        steps, values = zip(*points, strict=False)
        fig = plt.figure()
        plt.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        plt.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
        plt.title(f"training {key} of {output_dir}")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.legend()
        path = os.path.join(output_dir, f"training_{key.replace('/', '_')}.png")
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)
        written.append(path)
    return written
