"""The fake npu device (tests/fake_npu) and npu-ft's device layer on it.

The fake is a PrivateUse1 backend over host memory (built once per machine with
torch.utils.cpp_extension); see tests/fake_npu/__init__.py. These tests prove the plumbing - the
device layer finds an "npu", counts its memory per phase, tensors move and compute on it, autograd
flows - not anything about Ascend hardware: the ``ascend``-marked test at the end runs the device
layer checks on a real torch_npu device where one exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tests.fake_npu as fake
from npu_ft.device import ENV_VAR, all_backends, backend_for_tensor, get_backend
from tests.fake_npu.fixtures import fake_npu  # noqa: F401  (module-scoped fixture)

REPO = Path(__file__).resolve().parents[2]
MB = 2**20


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


# -- the device layer sees it ------------------------------------------------------------------
def test_device_layer_sees_the_npu(fake_npu, no_env):
    npu = get_backend("npu")
    assert npu.name == "npu" and npu.dist_backend == "hccl"
    assert npu.device_count() == 1
    assert npu.device_name() == "FakeNPU"
    assert npu.supports_bf16() and npu.supports_fp16()
    assert npu.torch_device() == torch.device("npu")
    assert npu.device_for_local_rank(3) == torch.device("npu", 0)  # round-robin over 1 device
    info = npu.describe()
    assert info == {
        "device": "npu", "dist_backend": "hccl", "available": True, "device_name": "FakeNPU",
        "device_count": 1, "bf16": True, "fp16": True,
    }


def test_auto_prefers_the_npu(fake_npu, no_env):
    assert get_backend("auto").name == "npu"
    assert get_backend(None).name == "npu"


def test_backend_for_npu_tensor(fake_npu):
    assert backend_for_tensor(torch.zeros(2, device="npu")).name == "npu"


def test_load_is_idempotent(fake_npu):
    runtime = fake.load_fake_npu()
    assert fake.load_fake_npu() is runtime
    assert torch.npu is runtime
    assert torch._C._get_privateuse1_backend_name() == "npu"


def test_set_device_and_synchronize(fake_npu):
    npu = get_backend("npu")
    npu.set_device(torch.device("npu", 0))
    npu.synchronize()
    npu.empty_cache()
    with pytest.raises(ValueError, match="invalid npu device index 1"):
        torch.npu.set_device(1)


# -- memory accounting -------------------------------------------------------------------------
def test_memory_grows_with_allocations_and_resets_per_phase(fake_npu):
    npu = get_backend("npu")
    npu.reset_peak_memory()
    start = npu.memory()
    assert start.kind == "allocator"
    assert start.peak_bytes == start.current_bytes

    big = torch.empty(8 * MB, dtype=torch.uint8, device="npu")
    during = npu.memory()
    assert during.current_bytes - start.current_bytes == 8 * MB
    del big
    after = npu.memory()
    assert after.current_bytes == start.current_bytes
    assert after.peak_bytes - start.current_bytes == 8 * MB  # the peak remembers the phase

    npu.reset_peak_memory()  # next phase
    small = torch.ones(256 * 1024, dtype=torch.float32, device="npu")  # 1 MB
    phase2 = npu.memory()
    assert phase2.peak_bytes - start.current_bytes == 1 * MB
    assert phase2.peak_bytes < after.peak_bytes
    del small


def test_temporaries_count_toward_the_peak(fake_npu):
    npu = get_backend("npu")
    a = torch.ones(1024, 1024, device="npu")  # 4 MB
    npu.reset_peak_memory()
    base = npu.memory().current_bytes
    b = (a * 2 + 1).sum()  # a*2 and +1 make 4 MB temporaries on the device
    assert npu.memory().peak_bytes - base >= 4 * MB
    assert b.device.type == "npu"


def test_runtime_memory_api_matches_the_device_layer(fake_npu):
    x = torch.zeros(1000, device="npu")
    assert torch.npu.memory_allocated() == get_backend("npu").memory().current_bytes
    assert torch.npu.max_memory_allocated() >= torch.npu.memory_allocated() >= x.numel() * 4
    torch.npu.reset_peak_memory_stats()
    assert torch.npu.max_memory_allocated() == torch.npu.memory_allocated()


# -- tensors on the device ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int32, torch.int64, torch.bool]
)
def test_round_trip_keeps_values(fake_npu, dtype):
    src = (torch.randn(7, 13) * 50).to(dtype)
    on_npu = src.to("npu")
    assert on_npu.device == torch.device("npu", 0) and on_npu.dtype == dtype and on_npu.is_npu
    assert torch.equal(on_npu.cpu(), src)


def test_views_strides_and_casts(fake_npu):
    src = torch.randn(6, 10)
    x = src.npu()
    assert torch.equal(x.t().contiguous().cpu(), src.t().contiguous())
    assert torch.equal(x[1:5:2, ::3].cpu(), src[1:5:2, ::3])
    assert torch.equal(x.view(3, 20).cpu(), src.view(3, 20))
    assert torch.equal(x.reshape(2, 3, 10).permute(2, 0, 1).cpu(), src.reshape(2, 3, 10).permute(2, 0, 1))
    assert torch.equal(x.to(torch.bfloat16).cpu(), src.to(torch.bfloat16))
    assert torch.equal(x.unsqueeze(0).expand(4, 6, 10).sum(0).cpu(), src.unsqueeze(0).expand(4, 6, 10).sum(0))
    view = x[2]
    view.mul_(0)  # in-place op through the fallback writes through the view
    assert torch.equal(x[2].cpu(), torch.zeros(10))
    empty = torch.empty(0, 5, device="npu")
    assert empty.cpu().shape == (0, 5)
    grown = torch.empty(3, device="npu")
    grown.resize_(10)
    assert grown.shape == (10,)


def test_ops_run_through_the_cpu_fallback(fake_npu):
    fake.reset_fallback_calls()
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    out = a.npu() @ b.npu()
    assert out.device.type == "npu"
    torch.testing.assert_close(out.cpu(), a @ b)
    assert any(op.startswith("aten::mm") for op in fake.fallback_ops())


def test_cpu_tensors_never_reach_the_fake(fake_npu):
    fake.reset_fallback_calls()
    before = fake.allocation_calls()
    a = torch.randn(64, 64)
    (a @ a).relu().sum().item()
    assert fake.fallback_ops() == []
    assert fake.allocation_calls() == before


def test_autograd_on_npu_tensors(fake_npu):
    torch.manual_seed(0)
    w_cpu = torch.randn(8, 5, requires_grad=True)
    x_cpu = torch.randn(4, 5)
    w = w_cpu.detach().npu().requires_grad_()
    loss = torch.nn.functional.linear(x_cpu.npu(), w).tanh().square().sum()
    loss.backward()
    torch.nn.functional.linear(x_cpu, w_cpu).tanh().square().sum().backward()
    assert w.grad.device.type == "npu"
    torch.testing.assert_close(w.grad.cpu(), w_cpu.grad)


def test_manual_seed_makes_npu_random_reproducible(fake_npu):
    npu = get_backend("npu")
    npu.manual_seed(123)
    first = torch.randn(5, device="npu").cpu()
    npu.manual_seed(123)
    assert torch.equal(torch.randn(5, device="npu").cpu(), first)


def test_deactivate_hides_the_npu_until_activated(fake_npu, no_env):
    npu = all_backends()["npu"]
    try:
        fake.deactivate()
        npu.reprobe()
        assert not torch.npu.is_available()
        assert npu.unavailable_reason().startswith("no NPU device visible")
        assert get_backend("auto").name != "npu"
        assert torch.zeros(2, device="npu").cpu().tolist() == [0.0, 0.0]  # tensors still work
    finally:
        fake.activate()
        npu.reprobe()
    assert get_backend("auto").name == "npu"


# -- loading it leaves the rest of the process alone -------------------------------------------
def test_loading_leaves_cpu_code_working_in_a_fresh_process(fake_npu):
    code = textwrap.dedent(
        """
        import torch
        import tests.fake_npu as fake
        from npu_ft.device import all_backends, get_backend
        with fake.fake_npu_active():
            assert get_backend("auto").name == "npu"
            y = torch.ones(3, device="npu") * 2
        # switched off again: CPU-only code behaves as on a machine without an npu
        assert get_backend("auto").name == "cpu", get_backend("auto").name
        assert not torch.accelerator.is_available()
        loader = torch.utils.data.DataLoader(torch.arange(8.0), batch_size=4, pin_memory=True)
        assert [b.sum().item() for b in loader] == [6.0, 22.0]
        m = torch.nn.Linear(4, 2)
        m(torch.randn(3, 4)).sum().backward()
        assert m.weight.grad.device.type == "cpu"
        assert y.cpu().tolist() == [2.0, 2.0, 2.0]
        print("OK")
        """
    )
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


# -- the same device-layer checks on a real Ascend NPU -----------------------------------------
@pytest.mark.ascend
def test_device_layer_on_real_ascend(no_env):
    npu = get_backend("npu")
    assert npu.device_count() >= 1
    assert npu.device_name()
    npu.reset_peak_memory()
    start = npu.memory()
    block = torch.empty(64 * MB, dtype=torch.uint8, device=npu.torch_device(0))
    assert npu.memory().peak_bytes - start.current_bytes >= 64 * MB
    del block
    npu.empty_cache()
    npu.reset_peak_memory()
    small = torch.empty(MB, dtype=torch.uint8, device=npu.torch_device(0))
    assert npu.memory().peak_bytes - start.current_bytes < 64 * MB
    del small
