"""The device layer on whatever this machine has (CPU here): selection, errors, CPU memory phases,
the lazy torch_npu import, dist backend names, and that only npu_ft/device talks to torch.cuda /
torch.npu."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import npu_ft.device as device_layer
from npu_ft.device import (
    AUTO_ORDER,
    ENV_VAR,
    DeviceUnavailableError,
    all_backends,
    backend_for_tensor,
    get_backend,
    select_device,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def _force(monkeypatch, available: dict[str, bool]) -> None:
    """Make the named backends report themselves (un)available."""
    for name, ok in available.items():
        backend = all_backends()[name]
        reason = None if ok else f"{name} switched off by the test"
        monkeypatch.setattr(backend, "unavailable_reason", lambda reason=reason: reason)


# -- selection ---------------------------------------------------------------------------------
def test_explicit_cpu(no_env):
    backend = get_backend("cpu")
    assert backend.name == "cpu"
    assert backend.torch_device() == torch.device("cpu")
    assert get_backend(" CPU ").name == "cpu"  # names are trimmed and case-insensitive


def test_select_device_returns_backend_and_device(no_env, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    backend, dev = select_device("cpu")
    assert backend.name == "cpu" and dev == torch.device("cpu")


def test_env_var_picks_the_device(no_env, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert get_backend().name == "cpu"
    monkeypatch.setenv(ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=r"NPU_FT_DEVICE='tpu' is not a device: expected one of auto, cpu, cuda, npu"):
        get_backend()


def test_explicit_name_beats_env_var(no_env, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "tpu")  # would fail if it were read
    assert get_backend("cpu").name == "cpu"


def test_auto_order_is_npu_then_cuda_then_cpu(no_env, monkeypatch):
    assert AUTO_ORDER == ("npu", "cuda", "cpu")
    _force(monkeypatch, {"npu": True, "cuda": True})
    assert get_backend("auto").name == "npu"
    _force(monkeypatch, {"npu": False, "cuda": True})
    assert get_backend("auto").name == "cuda"
    assert get_backend(None).name == "cuda"  # no env var: auto
    _force(monkeypatch, {"npu": False, "cuda": False})
    assert get_backend("auto").name == "cpu"


def test_auto_on_this_machine_never_fails(no_env):
    backend = get_backend("auto")
    assert backend.is_available()
    assert backend.name in AUTO_ORDER


@pytest.mark.parametrize("name", ["gpu", "xpu", "", "cuda0", "npu-0"])
def test_unknown_device_name_is_a_value_error(no_env, name):
    with pytest.raises(ValueError, match="unknown device"):
        get_backend(name)


def test_device_index_suffix_is_accepted(no_env):
    assert get_backend("cpu:0").name == "cpu"


# ids avoid the bare words "cuda"/"ascend": the shared conftest treats any such keyword as a marker
@pytest.mark.parametrize("name", ["npu", "cuda"], ids=["dev-npu", "dev-cuda"])
def test_explicit_unavailable_device_says_why(no_env, name):
    backend = all_backends()[name]
    reason = backend.unavailable_reason()
    if reason is None:
        pytest.skip(f"{name} is usable on this machine")
    with pytest.raises(DeviceUnavailableError) as err:
        get_backend(name)
    assert str(err.value) == f"{name} unavailable: {reason}"
    assert reason.strip()
    assert isinstance(err.value, RuntimeError)


def test_unavailable_accelerator_reports_zero_devices(no_env, monkeypatch):
    _force(monkeypatch, {"cuda": False})
    assert all_backends()["cuda"].device_count() == 0
    with pytest.raises(DeviceUnavailableError, match="cuda unavailable: cuda switched off"):
        get_backend("cuda")


def test_backend_for_tensor():
    assert backend_for_tensor(torch.zeros(1)).name == "cpu"


def test_describe_of_an_unavailable_backend_has_the_reason():
    for backend in all_backends().values():
        info = backend.describe()
        assert info["device"] == backend.name
        if not info["available"]:
            assert info["reason"]


# -- dist backends -----------------------------------------------------------------------------
def test_dist_backend_names():
    names = {name: backend.dist_backend for name, backend in all_backends().items()}
    assert names == {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


# -- CPU memory per phase ----------------------------------------------------------------------
def _phase_peak(nbytes: int):
    from npu_ft.bench.measure import trim_heap

    # an earlier in-process training run may have raised glibc's trim threshold (cpu_malloc_tuning):
    # hand the free heap back first, so this phase's pages are new ones
    trim_heap()
    cpu = get_backend("cpu")
    cpu.reset_peak_memory()
    baseline = cpu.memory().current_bytes
    block = torch.ones(nbytes // 4, dtype=torch.float32)  # ones: every page is touched
    block.add_(1)
    del block
    reading = cpu.memory()
    return reading.peak_bytes - baseline, reading


def test_cpu_peak_memory_is_per_phase():
    big, reading = _phase_peak(200 * 2**20)
    if reading.kind != "rss":
        pytest.skip(f"per-phase RSS peak not resettable here (reading kind {reading.kind!r})")
    small, _ = _phase_peak(20 * 2**20)
    assert big >= 180 * 2**20, f"200 MB phase peaked only {big / 2**20:.0f} MB above its start"
    assert small < 80 * 2**20, f"20 MB phase peaked {small / 2**20:.0f} MB: the earlier phase leaked into it"
    assert small < big


def test_cpu_memory_reading_fields():
    cpu = get_backend("cpu")
    cpu.reset_peak_memory()
    reading = cpu.memory()
    assert reading.peak_bytes >= reading.current_bytes > 0 or reading.kind == "rss-current"
    assert reading.kind in ("rss", "rss-current")


# -- lazy torch_npu ----------------------------------------------------------------------------
BROKEN_TORCH_NPU = 'raise RuntimeError("libascendcl.so: cannot open shared object file (CANN not installed)")\n'


def _run_with_broken_torch_npu(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(BROKEN_TORCH_NPU)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO), env.get("PYTHONPATH", "")])
    env.pop(ENV_VAR, None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )


def test_broken_torch_npu_makes_npu_unavailable_not_import_error(tmp_path):
    result = _run_with_broken_torch_npu(
        tmp_path,
        """
        import sys
        import npu_ft
        assert "torch_npu" not in sys.modules, "import npu_ft must not import torch_npu"
        import npu_ft.device as d
        assert "torch_npu" not in sys.modules, "importing the device layer must not import torch_npu"
        print("AUTO", d.get_backend("auto").name)
        try:
            d.get_backend("npu")
        except d.DeviceUnavailableError as exc:
            print("ERR", exc)
        print("DESCRIBE", d.all_backends()["npu"].describe())
        """,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert lines["AUTO"] in ("cpu", "cuda")
    assert lines["ERR"].startswith("npu unavailable: torch_npu could not be imported (RuntimeError: libascendcl.so")
    assert "'available': False" in lines["DESCRIBE"]


def test_broken_torch_npu_with_env_var_names_the_reason(tmp_path):
    result = _run_with_broken_torch_npu(
        tmp_path,
        """
        import os
        os.environ["NPU_FT_DEVICE"] = "npu"
        import npu_ft.device as d
        try:
            d.get_backend()
        except d.DeviceUnavailableError as exc:
            print(exc)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("npu unavailable: torch_npu could not be imported")


# -- only npu_ft/device names the accelerators -------------------------------------------------
ACCELERATOR_MODULE = re.compile(r"\btorch\s*\.\s*(cuda|npu)\b")


def test_nothing_outside_the_device_layer_mentions_torch_cuda_or_npu():
    package = REPO / "npu_ft"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] == "device":
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if ACCELERATOR_MODULE.search(line):
                offenders.append(f"npu_ft/{rel}:{lineno}: {line.strip()}")
    assert not offenders, "ask npu_ft.device instead of naming the accelerator module:\n" + "\n".join(offenders)


def test_device_layer_module_exports():
    assert set(device_layer.__all__) >= {"get_backend", "select_device", "all_backends", "DeviceUnavailableError"}
