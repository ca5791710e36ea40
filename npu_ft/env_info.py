"""Facts about the environment for `npu-ft env`, `npu-ft doctor` and benchmark reports."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = (
    "torch", "torch_npu", "triton", "transformers", "peft", "accelerate", "safetensors",
    "bitsandbytes", "deepspeed", "npu-ft",
)


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, None when absent (never imports them)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: Path | None = None) -> str | None:
    """Commit of the npu-ft checkout, when it is one (with '-dirty' for local changes)."""
    root = path or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_report(device_name: str | None = None) -> dict:
    """Everything a bug report or benchmark row needs about where it ran."""
    from npu_ft.device import all_backends, get_backend

    chosen = get_backend(device_name)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "git_commit": git_commit(),
        "chosen_device": chosen.name,
        "devices": {name: backend.describe() for name, backend in all_backends().items()},
    }
