"""npu-ft's log: INFO by default on stderr, in LLaMA-Factory's format, and a copy in
``output_dir/running_log.txt`` during a run.

``NPU_FT_VERBOSITY`` (or ``npu-ft train --log-level``) sets the level: DEBUG, INFO (default),
WARNING, ERROR, as ``LLAMAFACTORY_VERBOSITY`` does for LLaMA-Factory. Libraries' import-time notices
that do not concern an npu-ft run are held back unless the level is DEBUG: bitsandbytes' optional
``kernels`` package notice (npu-ft has its own NF4 kernels), DeepSpeed's accelerator detection line.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["FORMAT", "RUNNING_LOG", "VERBOSITY_ENV", "add_run_log", "log_level", "remove_run_log", "setup_logging"]

VERBOSITY_ENV = "NPU_FT_VERBOSITY"
RUNNING_LOG = "running_log.txt"
#: LLaMA-Factory's log format
FORMAT = "[%(levelname)s|%(asctime)s] %(name)s:%(lineno)s >> %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: library loggers whose notices are noise for an npu-ft run (shown at DEBUG)
QUIET_LIBRARIES = ("bitsandbytes", "DeepSpeed", "deepspeed")

_HANDLER_ATTR = "_npu_ft_handler"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests and tools replace it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Below(logging.Filter):
    """Drops records under a level (a library that resets its logger's level when it is imported
    keeps its filters: DeepSpeed's logger)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class LogLevelError(ValueError):
    """A log level that is not DEBUG / INFO / WARNING / ERROR / CRITICAL (names where it came from)."""


def log_level(level: str | None = None) -> int:
    """The level asked for: ``level``, else ``$NPU_FT_VERBOSITY``, else INFO."""
    source = "--log-level" if level else VERBOSITY_ENV
    name = (level or os.environ.get(VERBOSITY_ENV) or "INFO").strip().upper()
    if name not in LEVELS:
        raise LogLevelError(f"{source}={name.lower()!r}: expected one of {', '.join(LEVELS)}")
    return getattr(logging, name)


def setup_logging(level: str | None = None) -> int:
    """Show npu-ft's log on stderr at ``level`` (see :func:`log_level`); idempotent. Returns the level."""
    value = log_level(level)
    root = logging.getLogger("npu_ft")
    if not any(getattr(h, _HANDLER_ATTR, False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        setattr(handler, _HANDLER_ATTR, True)
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(value)
    quiet = value if value <= logging.DEBUG else logging.ERROR
    for name in QUIET_LIBRARIES:
        library = logging.getLogger(name)
        library.setLevel(quiet)
        for old in [f for f in library.filters if isinstance(f, _Below)]:
            library.removeFilter(old)
        library.addFilter(_Below(quiet))
    return value


def add_run_log(output_dir: str) -> logging.Handler:
    """Also write npu-ft's and transformers' log lines to ``output_dir/running_log.txt`` (appended,
    as LLaMA-Factory does); give the handler back to :func:`remove_run_log`."""
    handler = logging.FileHandler(os.path.join(output_dir, RUNNING_LOG), encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler.setLevel(logging.INFO)
    logging.getLogger("npu_ft").addHandler(handler)
    logging.getLogger("transformers").addHandler(handler)
    return handler


def remove_run_log(handler: logging.Handler) -> None:
    logging.getLogger("npu_ft").removeHandler(handler)
    logging.getLogger("transformers").removeHandler(handler)
    handler.close()
