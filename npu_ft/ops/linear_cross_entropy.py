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
* rows go through in chunks of ``chunk_rows`` (default: the chunk's fp32 logits are ~64 MiB on an
  accelerator, ~256 MiB on CPU, where GEMMs of ~100 rows run 1.5x slower than of ~400), so
  the working set is a few ``[chunk_rows, V]`` tensors instead of the fp32 logits, the
  log-softmax and their gradient (3 x N x V x 4 bytes: 13.9 GiB for 2 x 4096 tokens of Qwen);
* trainable head (full fine-tuning; tied embeddings): forward saves hidden, weight, bias, labels
  and, per labelled row, its index and logsumexp (two ``[n]`` vectors) -- no logits. Backward
  recomputes the logits once (one extra ``h @ W.T`` GEMM per labelled row is the price) in chunks
  of the **vocabulary** holding as many logits as a row chunk (``[n, chunk_rows * V / n]``),
  forms ``g = (softmax - onehot) * grad / denom`` and writes ``grad_W[cols] = g.T @ h`` and
  ``grad_bias[cols] = g.sum(0)`` once per chunk, accumulating only the small ``[n, H]``
  ``grad_hidden += g @ W[cols]``. (Row chunks would re-read and re-write the whole ``[V, H]``
  grad_W once per chunk.)
* frozen head (LoRA / QLoRA), when autograd needs the hidden states' gradient: the loss is a sum,
  so ``d sum / d logits = softmax - onehot`` does not depend on the upstream gradient; forward
  computes ``(softmax - onehot) @ W`` per row chunk right away and saves that ``[n, H]`` float32
  matrix (no hidden, no weight); backward only scales it by ``grad / denom`` and scatters it into
  ``[N, H]``. Same two GEMMs as the unfused path, no recompute.

Numerics follow transformers: the GEMM runs in the inputs' dtype (the autocast dtype under
``torch.autocast``, as ``nn.Linear`` would), the logits are upcast to ``logit_dtype`` (float32)
before log-softmax, the gradient of the logits is cast back to the GEMM dtype for the two backward
GEMMs, and ``grad_hidden`` / ``grad_weight`` / ``grad_bias`` come back in the inputs' own dtypes.
Across vocabulary chunks ``grad_hidden`` is accumulated in float32. Pure torch: runs on any device
(cpu, cuda, npu); no custom kernel.

Entry point: :func:`linear_cross_entropy`. The model patch that uses it is
:func:`npu_ft.modules.fused_loss.enable_fused_cross_entropy`.
"""

from __future__ import annotations

import contextlib

import torch

from . import _registry

__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_CHUNK_BYTES_CPU", "default_chunk_rows", "linear_cross_entropy"]

# not a torch.library op, but npu-ft doctor checks it against the unfused loss with this table
_registry.set_tolerances("linear_cross_entropy", _registry.FLOAT_TOLERANCES)

#: default size of one chunk's logits (in ``logit_dtype``): accelerators
DEFAULT_CHUNK_BYTES = 64 << 20
#: ... and CPU (host memory is plentiful; small-M GEMMs are slow there)
DEFAULT_CHUNK_BYTES_CPU = 256 << 20


def default_chunk_rows(vocab_size: int, logit_dtype: torch.dtype = torch.float32,
                       chunk_bytes: int | None = None, device: str | torch.device | None = None) -> int:
    """Rows per chunk such that a chunk's logits take about ``chunk_bytes`` (default
    :data:`DEFAULT_CHUNK_BYTES`, :data:`DEFAULT_CHUNK_BYTES_CPU` for a cpu ``device``); a multiple
    of 8 when at least 8. Qwen's vocab 151,936 in fp32: 104 rows (60 MiB), cpu 440 rows (255 MiB)."""
    if chunk_bytes is None:
        cpu = device is not None and torch.device(device).type == "cpu"
        chunk_bytes = DEFAULT_CHUNK_BYTES_CPU if cpu else DEFAULT_CHUNK_BYTES
    per_row = max(1, int(vocab_size)) * torch.empty((), dtype=logit_dtype).element_size()
    rows = max(1, chunk_bytes // per_row)
    return rows - rows % 8 if rows >= 8 else rows


def _autocast_dtype(device_type: str) -> torch.dtype | None:
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


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  logit_dtype: torch.dtype) -> torch.Tensor:
    """``(h @ weight.T + bias)`` in h's dtype, then upcast: [c, H] x [V, H] -> [c, V] logit_dtype.
    Always a fresh tensor (callers modify it in place)."""
    out = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
    return out.to(logit_dtype)


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over labelled rows of ``lse - logit[label]``; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, chunk_rows, compute_dtype, logit_dtype, eager_grad):
        # hidden [N, H], weight [V, H], bias [V]|None, labels [n] (of the labelled rows),
        # rows [n] int64 (their indices into hidden) -> scalar logit_dtype.
        # eager_grad: only hidden needs a gradient (frozen head): compute it here, per row chunk
        device_type = hidden.device.type
        n = rows.numel()
        # per labelled row: its logsumexp (trainable head) or its gradient (eager_grad); the other is empty
        lse_all = torch.empty(0 if eager_grad else n, dtype=logit_dtype, device=hidden.device)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        grad_rows = torch.empty((n if eager_grad else 0, hidden.shape[1]), dtype=acc_dtype, device=hidden.device)
        total = torch.zeros((), dtype=logit_dtype, device=hidden.device)
        with torch.no_grad(), _no_autocast(device_type):
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(compute_dtype)
            for start in range(0, n, chunk_rows):
                end = min(start + chunk_rows, n)
                h = hidden.index_select(0, rows[start:end]).to(compute_dtype)
                logits = _chunk_logits(h, w, b, logit_dtype)                 # [c, V]
                target = logits.gather(1, labels[start:end, None]).squeeze(1)  # [c]
                # logsumexp in place (no second [c, V] buffer): exp(x - max), summed
                row_max = logits.amax(dim=1)
                row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
                p = logits.sub_(row_max[:, None]).exp_()                     # [c, V]
                sum_exp = p.sum(dim=1)
                lse = row_max + sum_exp.log()                                # [c]
                total += (lse - target).sum()
                if eager_grad:  # d(sum)/d logits = softmax - onehot; times grad_output in backward
                    p.div_(sum_exp[:, None])
                    p.scatter_add_(1, labels[start:end, None],
                                   torch.full((end - start, 1), -1.0, dtype=logit_dtype, device=p.device))
                    grad_rows[start:end] = torch.mm(p.to(compute_dtype), w)
                else:
                    lse_all[start:end] = lse
                del logits, p
        if eager_grad:
            ctx.save_for_backward(rows, grad_rows)
            ctx.hidden_meta = (hidden.shape, hidden.dtype)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, rows, lse_all)
        ctx.eager_grad = eager_grad
        ctx.chunk_rows = chunk_rows
        ctx.compute_dtype = compute_dtype
        ctx.logit_dtype = logit_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.eager_grad:
            rows, grad_rows = ctx.saved_tensors
            shape, dtype = ctx.hidden_meta
            grad_hidden = torch.zeros(shape, dtype=dtype, device=grad_rows.device)
            if rows.numel():
                grad_hidden.index_copy_(0, rows, (grad_rows * grad_total.to(grad_rows.dtype)).to(dtype))
            return (grad_hidden, None, None) + (None,) * 6
        hidden, weight, bias, labels, rows, lse_all = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        cd, ld, chunk_rows = ctx.compute_dtype, ctx.logit_dtype, ctx.chunk_rows
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        if rows.numel() and (need_h or need_w or need_b):
            with torch.no_grad(), _no_autocast(hidden.device.type):
                w = weight.to(cd)
                b = None if bias is None else bias.to(cd)
                _backward_vocab_chunks(hidden, w, b, labels, rows, lse_all, grad_total.to(ld), chunk_rows, cd, ld,
                                       grad_h, grad_w, grad_b)
        return (grad_h, grad_w, grad_b) + (None,) * 6


def _backward_vocab_chunks(hidden, w, b, labels, rows, lse_all, scale, chunk_rows, cd, ld, grad_h, grad_w, grad_b):
    """Trainable head (full fine-tuning, tied embeddings): chunks of the vocabulary, all labelled
    rows at once, so every row block of grad_W (and grad_bias) is written by one GEMM, and only the
    small [n, H] grad of the hidden states is accumulated across chunks. (Row chunks would re-read
    and re-write the whole [V, H] grad_W once per chunk.) A chunk holds the same number of logits as
    a row chunk: [n, chunk_rows * V / n]. Exact because the forward saved each row's logsumexp."""
    n, vocab = rows.numel(), w.shape[0]
    cols = max(1, (chunk_rows * vocab) // n)
    h = hidden.index_select(0, rows).to(cd)                                    # [n, H]
    acc_dtype = torch.promote_types(cd, torch.float32)
    gh = torch.zeros(h.shape, dtype=acc_dtype, device=h.device) if grad_h is not None else None
    lse = lse_all[:, None]
    for v0 in range(0, vocab, cols):
        v1 = min(v0 + cols, vocab)
        wc = w[v0:v1]                                                          # [c, H]
        g = _chunk_logits(h, wc, None if b is None else b[v0:v1], ld)          # [n, c] logits
        g.sub_(lse).exp_()                                                     # softmax
        here = (labels >= v0) & (labels < v1)                                  # target in this chunk
        g.scatter_add_(1, (labels - v0).clamp_(0, v1 - v0 - 1)[:, None], here.to(ld).neg_()[:, None])
        g.mul_(scale)                                                          # d loss / d logits
        if grad_b is not None:
            grad_b[v0:v1] = g.sum(0).to(grad_b.dtype)
        g = g.to(cd)
        if grad_w is not None:
            grad_w[v0:v1] = torch.mm(g.t(), h).to(grad_w.dtype)                # [c, H], once
        if gh is not None:
            if gh.dtype == cd:
                gh.addmm_(g, wc)
            else:
                gh += torch.mm(g, wc)
        del g
    if grad_h is not None and gh is not None:
        grad_h.index_copy_(0, rows, gh.to(grad_h.dtype))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    chunk_rows: int | None = None,
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
        chunk_rows: labelled rows per chunk; default :func:`default_chunk_rows` (~64 MiB logits,
            ~256 MiB on cpu).
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
        chunk_rows = default_chunk_rows(vocab, logit_dtype, device=hidden.device)
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
            raise ValueError(f"labels: target ids must be in [0, {vocab}) or {ignore_index}, "
                             f"got {lo if lo < 0 else hi}")
    eager_grad = (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
    )
    total = _LinearCrossEntropySum.apply(hidden, weight, bias, targets, rows, chunk_rows, compute_dtype, ld, eager_grad)
    if num_items_in_batch is None:
        return total / n  # n == 0: 0 / 0 = nan, as torch's mean cross_entropy
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
