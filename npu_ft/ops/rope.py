"""``rope``: rotary position embedding applied to the queries and the keys in one call
(transformers' ``apply_rotary_pos_emb`` for Qwen2/Qwen3/Llama/Mistral, "half" rotation).

Math (``B`` batch, ``Hq``/``Hk`` query/key heads, ``S`` positions, ``D`` head dim, even)::

    q [B, Hq, S, D], k [B, Hk, S, D]   any strides with a unit last stride (transformers passes the
                                        [B, S, H, D] projections transposed); fp32 / bf16 / fp16
    cos, sin [B or 1, S, D]            q's dtype: the rotary embedding at each token's position id,
                                        so packed sequences (position ids restarting) need nothing else

    rot(x)  = cat(-x[..., D/2:], x[..., :D/2])
    q_out   = q * cos + rot(q) * sin,   k_out likewise        (same shape, strides and dtype)

Backward: ``rot`` is a rotation, so its transpose is ``-rot`` and the gradient of ``x`` is
``g * cos + rot^T(g * sin)``; the op keeps only ``cos`` and ``sin`` for it (shared by every layer of
a model, so nothing per layer). No gradient flows to cos/sin (transformers computes them without
one). Computation is in float32 with one rounding per output, so bf16 results are at least as
accurate as transformers' three roundings.

Kernels: the pure-torch reference here, cpu (native C++), cuda (Triton), npu
(torch_npu's ``npu_rotary_mul`` on the [B, S, H, D] view). Oracle: :func:`rope_oracle`
(transformers' formula, autograd).
"""

from __future__ import annotations

import torch

from . import _checks, _registry

__all__ = ["rope", "rope_oracle", "rope_reference", "rope_backward_reference", "rotate_half"]

ROPE = _registry.define("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)")
ROPE_BACKWARD = _registry.define(
    "rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) -> (Tensor, Tensor)"
)


def _like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor with x's shape, dtype and strides (a permuted layout is kept)."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def _rope_fake(q, k, cos, sin):
    return _like(q), _like(k)


def _rope_backward_fake(grad_q, grad_k, cos, sin):
    return _like(grad_q), _like(grad_k)


_registry.register_fake(ROPE, _rope_fake)
_registry.register_fake(ROPE_BACKWARD, _rope_backward_fake)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last dim (x1, x2 = its halves)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_transposed(x: torch.Tensor) -> torch.Tensor:
    """``rot^T(x) = cat(x2, -x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def _apply(x, cos, sin, transpose: bool):
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    x32 = x.float()
    if transpose:
        out32 = x32 * c + _rotate_half_transposed(x32 * s)
    else:
        out32 = x32 * c + rotate_half(x32) * s
    out = _like(x)
    out.copy_(out32)
    return out


def rope_reference(q, k, cos, sin):
    """Reference kernel of ``npu_ft::rope``: ``(q_out, k_out)`` with q's / k's shape and strides."""
    return _apply(q, cos, sin, transpose=False), _apply(k, cos, sin, transpose=False)


def rope_backward_reference(grad_q, grad_k, cos, sin):
    """Reference kernel of ``npu_ft::rope_backward``: ``(dq, dk) = g * cos + rot^T(g * sin)``."""
    return _apply(grad_q, cos, sin, transpose=True), _apply(grad_k, cos, sin, transpose=True)


_registry.register_reference(ROPE, rope_reference)
_registry.register_reference(ROPE_BACKWARD, rope_backward_reference)


def rope_oracle(q, k, cos, sin):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` written plainly."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.shapes = (q.shape, k.shape)
    ctx.save_for_backward(cos, sin)


def _backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    if grad_q is None:
        grad_q = cos.new_zeros(ctx.shapes[0])
    if grad_k is None:
        grad_k = cos.new_zeros(ctx.shapes[1])
    dq, dk = torch.ops.npu_ft.rope_backward(grad_q, grad_k, cos, sin)
    return dq, dk, None, None


_registry.register_autograd(ROPE, _backward, _setup_context)


def _check_heads(name: str, x: torch.Tensor, dtype: torch.dtype | None) -> None:
    _checks.check_tensor(name, x, (dtype,) if dtype is not None else _checks.FLOAT_DTYPES, ndim=4)
    if x.shape[-1] % 2:
        raise ValueError(f"{name}: head dim (last) must be even, got shape {tuple(x.shape)}")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q [B, Hq, S, D]`` and ``k [B, Hk, S, D]`` with ``cos``/``sin``
    ``[B or 1, S, D]`` (transformers' ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``).

    Bad input raises ``TypeError`` / ``ValueError`` naming the argument."""
    _check_heads("q", q, None)
    _check_heads("k", k, q.dtype)
    batch, _, seq, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != dim:
        raise ValueError(f"k: shape {tuple(k.shape)} does not match q's {tuple(q.shape)} (batch, positions, head dim)")
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.check_tensor(name, t, (q.dtype,), ndim=3)
        if t.shape[0] not in (1, batch) or t.shape[1] != seq or t.shape[2] != dim:
            raise ValueError(f"{name}: expected shape [{batch} or 1, {seq}, {dim}], got {tuple(t.shape)}")
        if t.requires_grad:
            raise ValueError(f"{name}: gradients w.r.t. cos/sin are not supported (compute them under no_grad)")
    if sin.shape != cos.shape:
        raise ValueError(f"sin: shape {tuple(sin.shape)} differs from cos's {tuple(cos.shape)}")
    _checks.check_same_device("q", q, k=k, cos=cos, sin=sin)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    return torch.ops.npu_ft.rope(q, k, cos, sin)
