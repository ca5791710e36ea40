"""Running the real ``npu-ft`` console entry point in a subprocess, as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: a subprocess that takes longer than this hangs (normal: seconds)
HANG_S = 600


def cli_env(**extra: str) -> dict[str, str]:
    """The user's environment with this checkout first on the path and no launcher variables."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for name in ("NPU_FT_DEVICE", "NPU_FT_DEBUG", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NPROC_PER_NODE", "NNODES",
                 "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    env.update(extra)
    return env


def npu_ft(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``npu-ft ARGS`` (the console script's ``main``) in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "npu_ft.cli", *args], env=env or cli_env(), cwd=str(cwd or ROOT),
                          capture_output=True, text=True, timeout=HANG_S)


def foreign_lines(text: str) -> list[str]:
    """Lines that npu-ft did not print (its lines start with ``npu-ft`` or argparse's ``usage:``)."""
    return [line for line in text.splitlines()
            if line.strip() and not line.startswith(("npu-ft", "usage:", "  ", "\t"))]


