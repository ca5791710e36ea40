"""The fused decoder-block ops forward + backward against transformers' modules, CPU fp32, Qwen2.5-0.5B
shapes, 1024 tokens, same inputs, same run:

* ``rms_norm``: a ``Qwen2RMSNorm(896)`` patched by ``apply_fused_kernels`` vs the unpatched module
  (trainable weight, as in full fine-tuning);
* ``add + rms_norm``: ``npu_ft.ops.rms_norm.rms_norm(x, w, eps, residual)`` vs ``residual + x`` then
  ``Qwen2RMSNorm`` (the decoder layer's post-attention pair);
* ``rope``: ``npu_ft.ops.rope.rope`` vs transformers' ``apply_rotary_pos_emb`` on q [1, 14, 1024, 64]
  and k [1, 2, 1024, 64] in transformers' layout (the projections transposed);
* ``swiglu``: ``npu_ft.ops.swiglu.swiglu(gate, up)`` vs ``ACT2FN["silu"](gate) * up`` (Qwen2MLP) on
  [1, 1024, 4864].

Memory: each side records the bytes autograd keeps for backward (``saved_bytes``: storages saved
by the op's graph that are not its inputs, parameters or cos/sin, which exist anyway). Target
(issue 14): >= 1.5x transformers' speed; saved no more than transformers' (less for rms_norm and
swiglu).

    python -m pytest bench/micro/test_block_ops.py --benchmark-only
"""

from __future__ import annotations

import copy

import pytest
import torch

qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")

from transformers.activations import ACT2FN  # noqa: E402

from npu_ft.modules.fused_blocks import apply_fused_kernels  # noqa: E402
from npu_ft.ops import rms_norm as rn  # noqa: E402
from npu_ft.ops import rope as rp  # noqa: E402
from npu_ft.ops import swiglu as sw  # noqa: E402

TOKENS, HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM = 1024, 896, 4864, 14, 2, 64
TARGET = ">= 1.5x, saved <= transformers"


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def saved_bytes(fn, inputs, owned) -> int:
    """Bytes autograd keeps for ``fn(*inputs)``'s backward beyond the storages of ``owned``."""
    skip = {t.untyped_storage().data_ptr() for t in owned}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def _leaves(*tensors):
    return [t.detach().requires_grad_(True) for t in tensors]


def _step(fn, inputs, grads):
    outs = fn(*_leaves(*inputs))
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(list(outs), list(grads))


def _bench(benchmark, group, fn, inputs, grads, owned_extra=(), target=""):
    leaves = _leaves(*inputs)
    benchmark.group = group
    info = {"saved_bytes": saved_bytes(fn, leaves, [*leaves, *owned_extra])}
    if target:
        info["target"] = target
    benchmark.extra_info.update(info)
    benchmark(_step, fn, inputs, grads)


# -- rms_norm -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def norms():
    plain = qwen2.Qwen2RMSNorm(HIDDEN, eps=1e-6)
    with torch.no_grad():
        plain.weight.copy_(1 + _randn(HIDDEN, seed=1) / 10)
    fused = copy.deepcopy(plain)
    assert apply_fused_kernels(fused) == ["rms_norm"]
    x, residual, grad = _randn(1, TOKENS, HIDDEN, seed=2), _randn(1, TOKENS, HIDDEN, seed=3), _randn(1, TOKENS, HIDDEN)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-6)
    return plain, fused, x, residual, grad


NORM_GROUP = f"rms_norm fwd+bwd {TOKENS}x{HIDDEN} (trainable weight)"
ADD_NORM_GROUP = f"add+rms_norm fwd+bwd {TOKENS}x{HIDDEN} (trainable weight)"


def test_rms_norm_npu_ft(benchmark, norms):
    _, fused, x, _, grad = norms
    _bench(benchmark, NORM_GROUP, fused, [x], [grad], list(fused.parameters()), TARGET + " (less)")


def test_rms_norm_baseline_transformers(benchmark, norms):
    plain, _, x, _, grad = norms
    _bench(benchmark, NORM_GROUP, plain, [x], [grad], list(plain.parameters()))


def test_add_rms_norm_npu_ft(benchmark, norms):
    _, fused, x, residual, grad = norms

    def fn(x, residual):
        return rn.rms_norm(x, fused.weight, fused.variance_epsilon, residual)

    _bench(benchmark, ADD_NORM_GROUP, fn, [x, residual], [grad, grad], [fused.weight], TARGET + " (less)")


def test_add_rms_norm_baseline_transformers(benchmark, norms):
    plain, _, x, residual, grad = norms

    def fn(x, residual):
        h = residual + x
        return plain(h), h

    _bench(benchmark, ADD_NORM_GROUP, fn, [x, residual], [grad, grad], [plain.weight])


# -- rope -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rope_inputs():
    config = qwen2.Qwen2Config(hidden_size=HIDDEN, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                               rope_theta=1e6)
    q = _randn(1, TOKENS, Q_HEADS, HEAD_DIM, seed=4).transpose(1, 2)
    k = _randn(1, TOKENS, KV_HEADS, HEAD_DIM, seed=5).transpose(1, 2)
    positions = torch.cat([torch.arange(600), torch.arange(TOKENS - 600)])[None]  # two packed sequences
    cos, sin = qwen2.Qwen2RotaryEmbedding(config)(q, positions)
    gq, gk = _randn(1, Q_HEADS, TOKENS, HEAD_DIM, seed=6), _randn(1, KV_HEADS, TOKENS, HEAD_DIM, seed=7)
    for a, b in zip(rp.rope(q, k, cos, sin), qwen2.apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return q, k, cos, sin, gq, gk


ROPE_GROUP = f"rope fwd+bwd q{Q_HEADS} k{KV_HEADS} S{TOKENS} D{HEAD_DIM}"


def test_rope_npu_ft(benchmark, rope_inputs):
    q, k, cos, sin, gq, gk = rope_inputs
    _bench(benchmark, ROPE_GROUP, lambda q, k: rp.rope(q, k, cos, sin), [q, k], [gq, gk], [cos, sin], TARGET)


def test_rope_baseline_transformers(benchmark, rope_inputs):
    q, k, cos, sin, gq, gk = rope_inputs
    _bench(benchmark, ROPE_GROUP, lambda q, k: qwen2.apply_rotary_pos_emb(q, k, cos, sin), [q, k], [gq, gk],
           [cos, sin])


# -- swiglu ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_inputs():
    gate, up, grad = (_randn(1, TOKENS, INTERMEDIATE, seed=s) for s in (8, 9, 10))
    torch.testing.assert_close(sw.swiglu(gate, up), ACT2FN["silu"](gate) * up, rtol=1e-5, atol=1e-6)
    return gate, up, grad


SWIGLU_GROUP = f"swiglu fwd+bwd {TOKENS}x{INTERMEDIATE}"


def test_swiglu_npu_ft(benchmark, mlp_inputs):
    gate, up, grad = mlp_inputs
    _bench(benchmark, SWIGLU_GROUP, sw.swiglu, [gate, up], [grad], (), TARGET + " (less)")


def test_swiglu_baseline_transformers(benchmark, mlp_inputs):
    gate, up, grad = mlp_inputs
    act = ACT2FN["silu"]
    _bench(benchmark, SWIGLU_GROUP, lambda g, u: act(g) * u, [gate, up], [grad])
