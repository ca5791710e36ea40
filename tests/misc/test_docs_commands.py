"""The commands in README.md and docs/*.md run as written, from a fresh copy of the repository.

Every fenced ``bash``/``python`` block in those files carries a marker on the line before it:

* ``<!-- runnable: cpu -->`` -- this test runs it (bash: ``bash -euo pipefail``; python: the block as a
  script) in a copy of the tracked files, the blocks of one file in order, so later blocks see what
  earlier ones wrote (the way a reader runs them);
* ``<!-- not-runnable: why -->`` -- it needs what CI does not have (a real model, an NPU, the setup
  itself), and says so.

A block without a marker fails the test, so no command is silently left unchecked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(bash|python|sh|console)\s*$")
_MARK = re.compile(r"^<!-- (runnable: cpu|not-runnable: .+) -->$")


def blocks(path: Path) -> list[tuple[int, str, str | None, str]]:
    """``(line, language, marker, code)`` of every shell/python block of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence:
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            mark = _MARK.match(lines[start - 1]) if start > 0 else None
            out.append((start + 1, fence.group(1), mark.group(1) if mark else None, "\n".join(body) + "\n"))
        i += 1
    return out


def test_every_block_is_marked():
    unmarked = [f"{p.relative_to(ROOT)}:{line}" for p in DOCS for line, _, mark, _ in blocks(p) if mark is None]
    assert unmarked == [], "mark each block <!-- runnable: cpu --> or <!-- not-runnable: why -->"


def _fresh_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
    return dest


RUNNABLE = [p for p in DOCS if any(mark == "runnable: cpu" for _, _, mark, _ in blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_runnable_blocks_run_from_a_fresh_copy(doc, tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to copy the tracked files from")
    repo = _fresh_copy(tmp_path / "repo")
    # the copy's npu_ft wins over the installed one; npu-ft / python are this environment's
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(repo), "NPU_FT_DEVICE": "cpu",
           "TOKENIZERS_PARALLELISM": "false"}
    for line, language, mark, code in blocks(doc):
        if mark != "runnable: cpu":
            continue
        cmd = ["bash", "-euo", "pipefail", "-c", code] if language != "python" else [sys.executable, "-c", code]
        # the timeout only catches a hang: each block takes seconds to a minute or two on 2 cores
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=3600)
        assert proc.returncode == 0, (f"{doc.relative_to(ROOT)}:{line} failed ({proc.returncode}):\n{code}\n"
                                      f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
