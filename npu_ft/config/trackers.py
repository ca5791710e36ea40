"""``report_to`` trackers: which Python package each one needs, checked before a run starts (not when a
recipe is read: a Kubernetes manifest may be written on a machine without the tracker)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from .schema import ConfigError

__all__ = ["TRACKER_MODULES", "check_trackers_installed", "missing_trackers"]

#: report_to name -> the Python module(s) whose presence transformers checks for it (any one will do;
#: kubeflow needs none)
TRACKER_MODULES: dict[str, tuple[str, ...]] = {
    "azure_ml": ("azureml",), "clearml": ("clearml",), "codecarbon": ("codecarbon",), "comet_ml": ("comet_ml",),
    "dagshub": ("dagshub",), "dvclive": ("dvclive",), "flyte": ("flytekit",), "kubeflow": (),
    "mlflow": ("mlflow",), "neptune": ("neptune",), "swanlab": ("swanlab",),
    "tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",), "wandb": ("wandb",),
}


def missing_trackers(report_to: Iterable[str]) -> list[str]:
    """The trackers of ``report_to`` whose package is not installed ("none" and "all" need none)."""
    missing = []
    for name in report_to:
        modules = TRACKER_MODULES.get(name)
        if modules and not any(importlib.util.find_spec(m) is not None for m in modules):
            missing.append(name)
    return missing


def check_trackers_installed(report_to: Iterable[str], source: str | None = None) -> None:
    """Raise a one-line :class:`ConfigError` naming ``report_to`` when a tracker's package is missing."""
    missing = missing_trackers(report_to)
    if missing:
        packages = ", ".join(TRACKER_MODULES[name][0] for name in missing)
        raise ConfigError(f"tracker {', '.join(repr(m) for m in missing)} needs the {packages} package, which is "
                          f"not installed (pip install {packages}, or remove it from report_to)", source=source,
                          key="report_to")
