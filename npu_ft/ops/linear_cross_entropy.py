"""Chunked, fused linear + cross-entropy for causal LMs: the output head and the loss in one op that
never holds the full ``[tokens, vocab]`` logits.

Shapes (``N`` = tokens, ``H`` = hidden size, ``V`` = vocabulary, ``n`` = tokens with a label)::

    hidden  [N, H]   last hidden states (float32 / bfloat16 / float16), already flattened
    weight  [V, H]   output head (``lm_head.weight``; tied or not, frozen or trainable)
    bias    [V]      optional
    labels  [N]      int64 target ids, **already shifted** (label of row i = the next token);
                     ``ignore_index`` marks rows without a target

    loss = sum_i (logsumexp(logits_i) - logits_i[labels_i]) / denom      (scalar, float32)
    logits_i = (hidden_i @ weight.T + bias).float()                      ([V] per row, never all rows)

``denom`` is ``num_items_in_batch`` when given (int or tensor: transformers' ``ForCausalLMLoss`` /
``fixed_cross_entropy`` under gradient accumulation, ``reduction="sum"`` then ``/ num_items``),
else the number of rows with a label (``reduction="mean"``). With no labelled row at all the mean is
``0 / 0 = nan``, exactly as ``torch.nn.functional.cross_entropy(..., reduction="mean")`` gives, and
the gradients are zero (also as torch's), so it never poisons the weights with NaN.

How it saves memory and time, compared with ``logits = lm_head(hidden).float(); cross_entropy(...)``
(transformers' ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` path):

* only the ``n`` rows with a label are ever multiplied with the head (SFT prompts are ``-100``);
* rows go through in chunks of ``chunk_rows`` (default: the chunk's fp32 logits are ~64 MiB), so
  the working set is a few ``[chunk_rows, V]`` tensors instead of the fp32 logits, the
  log-softmax and their gradient (3 x N x V x 4 bytes: 4.7 GiB for 2 x 4096 tokens of Qwen);
* forward saves hidden, weight, bias, labels and, per labelled row, its index and logsumexp (two
  ``[n]`` vectors). Backward recomputes each chunk's logits once:
  ``g = (softmax - onehot) * grad / denom``; ``grad_hidden[rows] = g @ W``;
  ``grad_W += g.T @ h`` (only when ``weight.requires_grad``: full fine-tuning, tied embeddings);
  ``grad_bias += g.sum(0)``. One extra ``h @ W.T`` GEMM per labelled row is the price.

Numerics follow transformers: the GEMM runs in the inputs' dtype (the autocast dtype under
``torch.autocast``, as ``nn.Linear`` would), the logits are upcast to ``logit_dtype`` (float32)
before log-softmax, the gradient of the logits is cast back to the GEMM dtype for the two backward
GEMMs, and ``grad_hidden`` / ``grad_weight`` / ``grad_bias`` come back in the inputs' own dtypes.
Across chunks ``grad_weight`` is accumulated in float32. Pure torch: runs on any device (cpu, cuda,
npu); no custom kernel.

Entry point: :func:`linear_cross_entropy`. The model patch that uses it is
:func:`npu_ft.modules.fused_loss.enable_fused_cross_entropy`.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

__all__ = ["DEFAULT_CHUNK_BYTES", "default_chunk_rows", "linear_cross_entropy"]

#: default size of one chunk's logits (in ``logit_dtype``)
DEFAULT_CHUNK_BYTES = 64 << 20


def default_chunk_rows(vocab_size: int, logit_dtype: torch.dtype = torch.float32,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk such that a chunk's logits take about ``chunk_bytes`` (a multiple of 8 when
    at least 8). Qwen's vocab 151,936 in fp32: 104 rows (60 MiB)."""
    per_row = max(1, int(vocab_size)) * torch.empty((), dtype=logit_dtype).element_size()
    rows = max(1, chunk_bytes // per_row)
    return rows - rows % 8 if rows >= 8 else rows


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, AttributeError):  # device type without autocast support
        pass
    return None


def _no_autocast(device_type: str):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, TypeError):  # pragma: no cover - device type without autocast support
        return contextlib.nullcontext()


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  logit_dtype: torch.dtype) -> torch.Tensor:
    """``(h @ weight.T + bias)`` in h's dtype, then upcast: [c, H] x [V, H] -> [c, V] logit_dtype.
    Always a fresh tensor (callers modify it in place)."""
    out = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
    return out.to(logit_dtype)


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over labelled rows of ``lse - logit[label]``; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, chunk_rows, compute_dtype, logit_dtype):
        # hidden [N, H], weight [V, H], bias [V]|None, labels [n] (of the labelled rows),
        # rows [n] int64 (their indices into hidden) -> scalar logit_dtype
        device_type = hidden.device.type
        n = rows.numel()
        lse_all = torch.empty(n, dtype=logit_dtype, device=hidden.device)
        total = torch.zeros((), dtype=logit_dtype, device=hidden.device)
        with torch.no_grad(), _no_autocast(device_type):
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(compute_dtype)
            for start in range(0, n, chunk_rows):
                end = min(start + chunk_rows, n)
                h = hidden.index_select(0, rows[start:end]).to(compute_dtype)
                logits = _chunk_logits(h, w, b, logit_dtype)                 # [c, V]
                lse = torch.logsumexp(logits, dim=1)                         # [c]
                target = logits.gather(1, labels[start:end, None]).squeeze(1)  # [c]
                total += (lse - target).sum()
                lse_all[start:end] = lse
                del logits
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse_all)
        ctx.chunk_rows = chunk_rows
        ctx.compute_dtype = compute_dtype
        ctx.logit_dtype = logit_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, labels, rows, lse_all = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        cd, ld, chunk_rows = ctx.compute_dtype, ctx.logit_dtype, ctx.chunk_rows
        n = rows.numel()
        n_chunks = -(-n // chunk_rows)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = None
        grad_b = torch.zeros(weight.shape[0], dtype=ld, device=hidden.device) if need_b else None
        scale = grad_total.to(ld)
        with torch.no_grad(), _no_autocast(hidden.device.type):
            w = weight.to(cd)
            b = None if bias is None else bias.to(cd)
            for start in range(0, n, chunk_rows):
                end = min(start + chunk_rows, n)
                idx = rows[start:end]
                h = hidden.index_select(0, idx).to(cd)                        # [c, H]
                g = _chunk_logits(h, w, b, ld)                                # [c, V] logits
                g.sub_(lse_all[start:end, None]).exp_()                       # softmax
                g.scatter_add_(1, labels[start:end, None],
                               torch.full((end - start, 1), -1.0, dtype=ld, device=g.device))
                g.mul_(scale)                                                 # d loss / d logits
                if need_b:
                    grad_b += g.sum(0)
                g_c = g.to(cd)
                del g
                if need_h:
                    grad_h.index_copy_(0, idx, torch.mm(g_c, w).to(hidden.dtype))
                if need_w:
                    if grad_w is None:
                        grad_w = torch.mm(g_c.t(), h)                          # [V, H]
                        if n_chunks > 1 and grad_w.dtype != torch.float32 and grad_w.dtype != torch.float64:
                            grad_w = grad_w.float()
                    elif grad_w.dtype == cd:
                        grad_w.addmm_(g_c.t(), h)
                    else:
                        grad_w += torch.mm(g_c.t(), h)
                del g_c
        if need_w:
            grad_w = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    num_items_in_batch: Union[int, float, torch.Tensor, None] = None,
    chunk_rows: Optional[int] = None,
    logit_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, without the full logits.

    Args:
        hidden: ``[N, H]`` float32/bfloat16/float16 (flatten ``[B, S, H]`` first).
        weight: ``[V, H]`` output head weight. Gets a gradient only if it requires one.
        labels: ``[N]`` integer targets in ``[0, V)``, already shifted; ``ignore_index`` = no target.
        bias: optional ``[V]``.
        ignore_index: label value of rows without a target (-100).
        num_items_in_batch: None -> mean over labelled rows; else ``sum / num_items_in_batch``
            (an int or a tensor, moved to the loss' device), as transformers' ``ForCausalLMLoss``.
        chunk_rows: labelled rows per chunk; default :func:`default_chunk_rows` (~64 MiB logits).
        logit_dtype: dtype of the logits for the softmax (float32, as transformers upcasts); never
            lower than the GEMM dtype (float64 inputs give float64 logits).

    Returns:
        scalar loss in ``logit_dtype``: ``nan`` for the mean over zero labelled rows (as torch).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden: expected a [N, H] tensor, got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected [V, {hidden.shape[1]}], got {tuple(getattr(weight, 'shape', ()))}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"hidden/weight: expected floating point, got {hidden.dtype} / {weight.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels: expected [{hidden.shape[0]}], got {tuple(getattr(labels, 'shape', ()))}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    vocab = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != vocab):
        raise ValueError(f"bias: expected [{vocab}], got {tuple(bias.shape)}")
    if weight.device != hidden.device or (bias is not None and bias.device != hidden.device):
        raise ValueError(f"weight/bias: expected on {hidden.device}, got {weight.device}")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(vocab, logit_dtype)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected a positive int, got {chunk_rows!r}")

    device_type = hidden.device.type
    compute_dtype = _autocast_dtype(device_type) if hidden.dtype != torch.float64 else None
    if compute_dtype is None:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        if bias is not None:
            compute_dtype = torch.promote_types(compute_dtype, bias.dtype)
    ld = torch.promote_types(logit_dtype, compute_dtype)

    labels = labels.to(device=hidden.device, dtype=torch.long)
    rows = (labels != ignore_index).nonzero().squeeze(1)            # [n]
    targets = labels.index_select(0, rows)                          # [n]
    n = rows.numel()
    if n:
        lo, hi = torch.stack(torch.aminmax(targets)).tolist()
        if lo < 0 or hi >= vocab:
            raise ValueError(f"labels: target ids must be in [0, {vocab}) or {ignore_index}, got {lo if lo < 0 else hi}")
    total = _LinearCrossEntropySum.apply(hidden, weight, bias, targets, rows, chunk_rows, compute_dtype, ld)
    if num_items_in_batch is None:
        return total / n  # n == 0: 0 / 0 = nan, as torch's mean cross_entropy
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
