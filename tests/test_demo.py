"""``npu-ft demo`` (README's main command) visibly learns, on CPU, within its time budget.

The demo runs in its own process, exactly as a user runs it (it sets torch's thread count and
glibc's malloc thresholds for itself). Its result is deterministic on a given machine (seeded,
CPU): with the defaults it goes from 0% to ~97% exact match on the held-out sentences (animal
100%, colour 90%, verb 100%). Another CPU / BLAS rounds differently and takes another trajectory;
the colour question is the one that is learned last (35% at 800 steps, 90% at 1000 here), so the
thresholds leave room there without letting a demo that does not learn pass. The 3-minute budget is
checked by hand and in docs/training.md, not here (timing on shared CI machines is noise): the run is
bounded by its step count, and the subprocess timeout only catches a hang.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

#: the default run takes ~2.5 minutes on 2 idle cores; only a hung demo takes this long
HANG_S = 4 * 3600


def _row(out: str, name: str) -> tuple[str, str]:
    match = re.search(rf"^{re.escape(name)}\s+(\S+(?: \(\d+%\))?)\s+(\S+(?: \(\d+%\))?)\s*$", out, re.MULTILINE)
    assert match, f"no {name!r} row in the demo output:\n{out}"
    return match.group(1), match.group(2)


def _share(cell: str) -> float:
    hit, total = re.match(r"(\d+)/(\d+)", cell).groups()
    return int(hit) / int(total)


@pytest.mark.slow
def test_demo_learns_from_zero(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from npu_ft.cli import main; sys.exit(main())",
            "demo",
            "--output-dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss_before, loss_after = map(float, _row(out, "held-out loss (target tokens)"))
    em_before, em_after = map(_share, _row(out, "exact match, all tasks"))
    assert loss_before > 10 and loss_after < 0.1 * loss_before, (loss_before, loss_after)
    assert em_before == 0.0, out
    assert em_after >= 0.75, out
    # 20 held-out examples per task: one answer is 5 points, and a change of rounding (e.g. the fused
    # decoder-block ops) moves a task by one or two answers; every learned task stays well above chance
    for task in ("Which animal is it?", "What does it do?"):
        assert _share(_row(out, f"  {task}")[1]) >= 0.8, out
    log = [json.loads(line) for line in (tmp_path / "demo" / "run" / "trainer_log.jsonl").read_text().splitlines()]
    assert max(rec["current_steps"] for rec in log) == 1000  # bounded by steps
    assert {rec["total_steps"] for rec in log} == {1000}
    assert "training:" in out and "whole demo:" in out
