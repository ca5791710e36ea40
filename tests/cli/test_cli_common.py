"""The conventions every subcommand shares (npu_ft.cli_common) and the tables pinned to their sources."""

from __future__ import annotations

import argparse
import importlib

import pytest

from npu_ft.cli_common import (
    DEVICE_CHOICES,
    INPUT_ERRORS,
    UsageError,
    is_input_error,
    non_negative_int,
    positive_float,
    positive_int,
    report,
)

from ._cli import HANG_S, ROOT, cli_env


def test_device_choices_are_the_device_layer_names():
    from npu_ft.device import all_backends

    assert DEVICE_CHOICES == ("auto", *all_backends())


@pytest.mark.parametrize("module, name", INPUT_ERRORS)
def test_every_listed_input_error_exists(module, name):
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type) and issubclass(cls, Exception)
    assert cls.__module__ == module, f"{name} is defined in {cls.__module__}: list that module"
    assert is_input_error(cls.__new__(cls))


def test_subclasses_of_input_errors_are_input_errors():
    from npu_ft.data import DataFileError

    class Sub(DataFileError):
        pass

    assert is_input_error(Sub("x"))


def test_other_errors_are_not_input_errors():
    assert not is_input_error(RuntimeError("bug"))
    assert not is_input_error(KeyError("bug"))
    assert is_input_error(UsageError("x"))


def test_report_is_one_line_and_picks_the_exit_code(capsys):
    assert report("npu-ft x", ValueError("first\n  second\n\nthird")) == 1
    assert capsys.readouterr().err == "npu-ft x: error: first second third\n"
    assert report("npu-ft x", UsageError("bad flag")) == 2
    assert capsys.readouterr().err == "npu-ft x: error: bad flag\n"


@pytest.mark.parametrize(
    "parse, good, bad",
    [
        (positive_int, {"1": 1, "12": 12}, ["0", "-3", "1.5", "x", ""]),
        (non_negative_int, {"0": 0, "7": 7}, ["-1", "x"]),
        (positive_float, {"0.5": 0.5, "3": 3.0}, ["0", "-1", "nan", "inf", "x"]),
    ],
)
def test_number_types(parse, good, bad):
    for text, value in good.items():
        assert parse(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_device_env_is_checked_by_name(monkeypatch):
    from npu_ft.device import DeviceNameError, device_name_from_env, get_backend

    assert device_name_from_env({}) == "auto"
    assert device_name_from_env({"NPU_FT_DEVICE": "CPU"}) == "CPU"
    assert device_name_from_env({"NPU_FT_DEVICE": "npu:1"}) == "npu:1"
    with pytest.raises(DeviceNameError, match=r"NPU_FT_DEVICE='gpu' is not a device: expected one of auto, cpu"):
        device_name_from_env({"NPU_FT_DEVICE": "gpu"})
    monkeypatch.setenv("NPU_FT_DEVICE", "gpu")
    with pytest.raises(DeviceNameError, match="NPU_FT_DEVICE='gpu'"):
        get_backend()
    with pytest.raises(DeviceNameError, match="unknown device 'tpu'"):
        get_backend("tpu")


def test_main_maps_an_unusable_device_to_exit_1(monkeypatch, capsys):
    from npu_ft import cli
    from npu_ft.device import DeviceUnavailableError

    def unusable(argv):
        raise DeviceUnavailableError("npu unavailable: torch_npu could not be imported")

    monkeypatch.setitem(cli.COMMANDS, "env", ("npu_ft.cli", "env_main", "x"))
    monkeypatch.setattr(cli, "env_main", unusable)
    assert cli.main(["env"]) == 1
    assert capsys.readouterr().err == "npu-ft env: error: npu unavailable: torch_npu could not be imported\n"


def test_cli_common_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, npu_ft.cli, npu_ft.cli_common; print(sorted(m for m in ('torch', 'transformers', 'yaml') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S, cwd=str(ROOT),
                         env=cli_env())
    assert out.stdout.strip() == "[]", out.stderr
