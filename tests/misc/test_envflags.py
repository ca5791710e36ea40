"""One reading of on/off environment variables."""

from __future__ import annotations

import doctest

import pytest

from npu_ft import envflags
from npu_ft.envflags import EnvFlagError, env_flag, parse_flag


def test_doctest():
    assert doctest.testmod(envflags).failed == 0


@pytest.mark.parametrize("value, default, expected", [
    (None, True, True), ("", False, False), (" ON ", False, True), ("Yes", False, True), ("1", False, True),
    ("off", True, False), ("FALSE", True, False), ("0", True, False), ("no", True, False),
])
def test_words(value, default, expected):
    assert parse_flag("X", value, default) is expected


def test_garbage_names_the_variable(monkeypatch):
    monkeypatch.setenv("NPU_FT_SOMETHING", "maybe")
    with pytest.raises(EnvFlagError, match=r"^NPU_FT_SOMETHING='maybe': expected one of 1, true"):
        env_flag("NPU_FT_SOMETHING")
