"""Paged optimizers: states in host memory, streamed per parameter to the device for the update.

On the test suite's fake npu device (host memory behind a counting allocator, so device memory is
measurable without hardware): the paged optimizer gives exactly the non-paged results, its states
live on the host, and the device holds only the parameters and gradients between steps (the
non-paged one adds every state). On CPU, paged is the non-paged optimizer (and says so in the log).
Whether copies overlap with compute on real hardware is not tested here (they do not: one stream).
"""

from __future__ import annotations

import logging

import pytest
import torch

from npu_ft.ops import kernel_calls, reset_kernel_calls
from npu_ft.optim import AdamW8bit, PagedAdamW8bit, PagedAdamW32bit
from tests.fake_npu.fixtures import fake_npu  # noqa: F401  (module-scoped fixture)

SHAPES = [(67, 129), (5000,), (31,), (3, 2000)]  # two large, one small (32-bit states), one 3-D


def _params(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in SHAPES]


def _train(opt_cls, device, steps=4, **kwargs):
    params = _params(device)
    opt = opt_cls(params, lr=1e-2, weight_decay=0.01, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()
    return opt, params


@pytest.mark.parametrize("paged_cls,plain_kwargs", [(PagedAdamW8bit, {}), (PagedAdamW32bit, {"optim_bits": 32})])
def test_paged_equals_non_paged_on_npu(fake_npu, paged_cls, plain_kwargs):  # noqa: F811
    reset_kernel_calls()
    paged, p_paged = _train(paged_cls, fake_npu)
    if paged_cls is PagedAdamW8bit:
        assert kernel_calls("adamw8bit_update").get("npu", 0) == 4 * 3  # 3 parameters with 8-bit states
    plain, p_plain = _train(AdamW8bit, fake_npu, **plain_kwargs)
    for a, b in zip(p_paged, p_plain, strict=True):
        assert torch.equal(a.cpu(), b.cpu())
        for key, value in plain.state[b].items():
            mine = paged.state[a][key]
            if isinstance(value, torch.Tensor):
                assert mine.device.type == "cpu", f"{key}: a paged state must live in host memory"
                assert value.device.type == "npu"
                assert torch.equal(mine, value.cpu()), key
            else:
                assert mine == value


def test_paged_keeps_states_off_the_device(fake_npu):  # noqa: F811
    from npu_ft.device import get_backend

    dev = get_backend("npu")
    held, peak, states, largest = {}, {}, {}, {}
    for cls in (AdamW8bit, PagedAdamW8bit, AdamW8bit):  # the first run warms the kernels' caches
        params = _params(fake_npu)
        opt = cls(params, lr=1e-2)
        for p in params:
            p.grad = torch.ones_like(p)
        before = dev.memory().current_bytes  # parameters + gradients
        opt.step()  # allocates the states
        dev.reset_peak_memory()
        opt.step()
        held[cls] = dev.memory().current_bytes - before
        peak[cls] = dev.memory().peak_bytes - before
        per_param = [sum(t.numel() * t.element_size() for k, t in st.items()
                         if isinstance(t, torch.Tensor) and not k.startswith("qmap")) for st in opt.state.values()]
        states[cls], largest[cls] = sum(per_param), max(per_param)
        del opt, params
    # the paged optimizer leaves only the device copies of its two code maps (256 float32 each)
    assert held[PagedAdamW8bit] == 2 * 256 * 4
    assert held[AdamW8bit] >= states[AdamW8bit]
    # during its step the device held one parameter's states at a time, not all of them
    saved = peak[AdamW8bit] - peak[PagedAdamW8bit]
    assert saved >= states[AdamW8bit] - largest[AdamW8bit] - held[PagedAdamW8bit], (peak, states, largest)


def test_paged_on_cpu_is_the_plain_optimizer_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="npu_ft.optim.adamw8bit"):
        paged, p_paged = _train(PagedAdamW8bit, torch.device("cpu"))
    plain, p_plain = _train(AdamW8bit, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(p_paged, p_plain, strict=True))
    lines = [r.getMessage() for r in caplog.records if "paged optimizer on cpu" in r.getMessage()]
    assert len(lines) == 1, "the CPU fallback must be logged exactly once"


def test_unpinnable_host_memory_is_logged_once(fake_npu, caplog):  # noqa: F811
    """The fake npu cannot page-lock host memory: the optimizer says so (once) instead of pretending."""
    with caplog.at_level(logging.WARNING, logger="npu_ft.optim.host_states"):
        opt, params = _train(PagedAdamW8bit, fake_npu, steps=2)
    assert not opt.state[params[0]]["state1"].is_pinned()
    lines = [r.getMessage() for r in caplog.records if "page-locked host memory is not available" in r.getMessage()]
    assert len(lines) == 1, lines
