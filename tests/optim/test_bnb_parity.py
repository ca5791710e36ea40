"""npu-ft's AdamW8bit against ``bitsandbytes.optim.AdamW8bit`` (0.50, its CPU kernels), byte for byte.

Bound asserted on the CPU: **zero** codes apart. After 10 steps on the same parameters and
gradients, ``state1``/``state2`` (uint8), ``absmax1``/``absmax2``, the float32 states of the small
parameter (< min_8bit_size, kept in 32 bits) and the parameters are identical to bitsandbytes'.
(On other devices the float order may differ: tests/ops/test_adamw8bit.py bounds the Triton kernel
at one code.) The sizes are awkward: not multiples of the 256 block, a 3-D parameter, one of
1,050,001 elements (more than one slice of the cpu kernel), a block that never gets a gradient,
and two parameter groups (with and without weight decay).
"""

from __future__ import annotations

import pytest
import torch

from npu_ft.optim import AdamW8bit

bnb = pytest.importorskip("bitsandbytes")

SHAPES = [(37, 301), (4099,), (63,), (2, 257, 9), (1_050_001,)]
STEPS = 10


def _params(dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _groups(params):
    return [{"params": params[:3], "weight_decay": 0.01}, {"params": params[3:], "weight_decay": 0.0}]


def _step_both(ours, theirs, params_a, params_b, gen, step):
    for a, b in zip(params_a, params_b, strict=True):
        g = torch.randn(a.shape, generator=gen).to(a.dtype)
        if a.numel() > 600 and step % 3:
            g.view(-1)[256:512] = 0
        a.grad, b.grad = g.clone(), g.clone()
    ours.step()
    theirs.step()


def _assert_identical(ours, theirs, params_a, params_b):
    for a, b in zip(params_a, params_b, strict=True):
        mine, ref = ours.state[a], theirs.state[b]
        assert mine["step"] == ref["step"]
        for key in ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"):
            assert (key in mine) == (key in ref), key
            if key in ref:
                assert mine[key].dtype == ref[key].dtype, key
                off = (mine[key].double() - ref[key].double()).abs().max()
                assert torch.equal(mine[key], ref[key]), f"{tuple(a.shape)} {key}: differs (max {off})"
        assert torch.equal(a, b), f"{tuple(a.shape)}: parameter differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_states_and_parameters_byte_identical_to_bitsandbytes(dtype):
    params_a, params_b = _params(dtype), _params(dtype)
    ours = AdamW8bit(_groups(params_a), lr=3e-3)
    theirs = bnb.optim.AdamW8bit(_groups(params_b), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        _step_both(ours, theirs, params_a, params_b, gen, step)
    assert ours.state[params_a[2]]["state1"].dtype == torch.float32  # 63 elements: 32-bit states
    assert ours.state[params_a[0]]["state1"].dtype == torch.uint8
    _assert_identical(ours, theirs, params_a, params_b)


def test_state_dicts_are_interchangeable():
    """A bitsandbytes state dict loads into npu-ft's optimizer (and back), and both keep stepping alike."""
    shapes = SHAPES[:4]
    params_a, params_b = _params(torch.bfloat16, shapes), _params(torch.bfloat16, shapes)
    ours = AdamW8bit(_groups(params_a), lr=3e-3)
    theirs = bnb.optim.AdamW8bit(_groups(params_b), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 4):
        _step_both(ours, theirs, params_a, params_b, gen, step)

    mine_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert mine_sd["state"].keys() == theirs_sd["state"].keys()
    for index, entry in theirs_sd["state"].items():
        assert mine_sd["state"][index].keys() == entry.keys()
        for key, sub in entry.get("__bnb_optimizer_quant_state__", {}).items():
            assert torch.equal(mine_sd["state"][index]["__bnb_optimizer_quant_state__"][key], sub), key

    # cross-load: ours <- bitsandbytes', bitsandbytes' <- ours; float32 absmax stays float32
    fresh_a = AdamW8bit(_groups(params_a), lr=3e-3)
    fresh_a.load_state_dict(theirs_sd)
    assert fresh_a.state[params_a[0]]["absmax1"].dtype == torch.float32
    fresh_b = bnb.optim.AdamW8bit(_groups(params_b), lr=3e-3)
    fresh_b.load_state_dict(mine_sd)
    for step in range(4, 7):
        _step_both(fresh_a, fresh_b, params_a, params_b, gen, step)
    _assert_identical(fresh_a, fresh_b, params_a, params_b)
