"""Reading npu-ft's on/off environment variables the same way everywhere.

>>> import os; os.environ["NPU_FT_EXAMPLE"] = "off"
>>> env_flag("NPU_FT_EXAMPLE", default=True)
False
"""

from __future__ import annotations

import os

__all__ = ["EnvFlagError", "FALSE_WORDS", "TRUE_WORDS", "env_flag", "parse_flag"]

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class EnvFlagError(ValueError):
    """An on/off environment variable with a value that is neither (names the variable)."""


def parse_flag(name: str, value: str | None, default: bool) -> bool:
    """``value`` of variable ``name`` as a bool; unset or empty -> ``default``; anything that is not
    1/true/yes/on or 0/false/no/off (any case) raises :class:`EnvFlagError`."""
    if value is None or not value.strip():
        return default
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise EnvFlagError(f"{name}={value!r}: expected one of 1, true, yes, on (or 0, false, no, off)")


def env_flag(name: str, default: bool = False) -> bool:
    """The on/off environment variable ``name`` (see :func:`parse_flag`)."""
    return parse_flag(name, os.environ.get(name), default)
