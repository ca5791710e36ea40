"""What every ``npu-ft`` subcommand shares: exit codes, the one-line error, argument types.

Exit codes (the same condition gives the same code in every subcommand; docs/training.md):

====  =====================================================================================
0     success
1     bad input (recipe, data file, model/adapter/export folder, environment variable) or a
      device that cannot be used here; one line on stderr naming the file, key or variable
2     usage: unknown command or flag, missing argument, a flag value of the wrong kind or range
130   interrupted (Ctrl-C)
====  =====================================================================================

This module imports nothing heavy: every subcommand's ``--help`` and argument errors go through it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Sequence

__all__ = [
    "DEVICE_CHOICES",
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "INPUT_ERRORS",
    "UsageError",
    "is_input_error",
    "one_line",
    "positive_float",
    "positive_int",
    "non_negative_int",
    "report",
    "wants_help",
]

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: values of ``--device`` flags and ``$NPU_FT_DEVICE`` (pinned to the device layer by a test)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "npu")

#: (defining module, class name) of every bad-input error of npu-ft. Matched against the classes of
#: a caught error by name, so naming one here imports nothing.
INPUT_ERRORS: tuple[tuple[str, str], ...] = (
    ("npu_ft.config.yaml_io", "YamlError"),
    ("npu_ft.logs", "LogLevelError"),
    ("npu_ft.config.schema", "ConfigError"),
    ("npu_ft.train.preflight", "PreflightError"),
    ("npu_ft.train.run", "TrainingError"),
    ("npu_ft.train.run_identity", "CheckpointError"),
    ("npu_ft.train.callbacks", "NonFiniteLossError"),
    ("npu_ft.train.export_folder", "ExportError"),
    ("npu_ft.data.dataset_info", "DatasetInfoError"),
    ("npu_ft.data.readers", "DataFileError"),
    ("npu_ft.data.converters", "DataFormatError"),
    ("npu_ft.model.loading", "ModelLoadError"),
    ("npu_ft.device.base", "DeviceUnavailableError"),
    ("npu_ft.device.base", "DeviceNameError"),
    ("npu_ft.launch.plan", "LaunchError"),
)


_INPUT_ERROR_NAMES = frozenset(INPUT_ERRORS)


class UsageError(ValueError):
    """A malformed command line (exit code 2)."""


def is_input_error(exc: BaseException) -> bool:
    """True when ``exc`` is one of npu-ft's bad-input errors (:data:`INPUT_ERRORS`) or a :class:`UsageError`."""
    if isinstance(exc, UsageError):
        return True
    return any((cls.__module__, cls.__qualname__) in _INPUT_ERROR_NAMES for cls in type(exc).__mro__)


def one_line(text: object) -> str:
    """``text`` with its line breaks (and runs of blanks around them) folded into single spaces."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report(prog: str, exc: BaseException | str) -> int:
    """Print ``PROG: error: MESSAGE`` as one line on stderr; return 2 for a :class:`UsageError`, else 1.

    With ``NPU_FT_DEBUG=1`` the traceback of the error being handled is printed first.
    """
    if os.environ.get("NPU_FT_DEBUG") and isinstance(exc, BaseException):
        traceback.print_exc()
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_BAD_INPUT


def wants_help(argv: Sequence[str]) -> bool:
    """``-h`` or ``--help`` anywhere among the arguments."""
    return any(arg in ("-h", "--help") for arg in argv)


def _number(kind: type, text: str, minimum: float, inclusive: bool, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    ok = value >= minimum if inclusive else value > minimum
    if not ok or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1 (0 or a negative number is a usage error, exit 2)."""
    return _number(int, text, 1, True, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse ``type=``: an integer >= 0."""
    return _number(int, text, 0, True, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse ``type=``: a number > 0."""
    return _number(float, text, 0.0, False, "a positive number")
