"""npu_ft.ops.linear_cross_entropy against the unfused reference transformers computes
(``cross_entropy(F.linear(hidden, W, b).float(), labels)`` with ``ForCausalLMLoss``'s reduction):
loss and the gradients of hidden, weight and bias, on odd shapes, chunk sizes that do not divide the
rows, some / no / all labels ignored, ``num_items_in_batch`` None / int / tensor, fp32, bf16 and
autocast; gradcheck in float64; what backward keeps; ignored rows are never read; argument errors.

Tolerances: fp32 rtol 1e-5 / atol 1e-6 (loss) and 1e-5 x max|ref| (grads: chunked sums are added
in another order). bf16: the logits GEMM is the same bf16 GEMM with fp32 accumulation, so the loss
agrees to rtol 1e-4; gradients are bf16 GEMMs of the same bf16-rounded softmax gradient,
accumulated over chunks in fp32 here and in one GEMM there: rtol 2e-2, atol 1e-2 x max|ref|.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from npu_ft.ops.linear_cross_entropy import default_chunk_rows, linear_cross_entropy

IGNORE = -100


def _reference(hidden, weight, labels, bias=None, num_items=None, ignore_index=IGNORE):
    """transformers' ForCausalLMLoss on already-shifted labels (fixed_cross_entropy)."""
    logits = F.linear(hidden, weight, bias).float()
    if num_items is None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="mean")
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items):
        num_items = num_items.to(loss.device)
    return loss / num_items


def _labels(n, vocab, pattern, gen):
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if pattern == "some":
        labels[torch.rand(n, generator=gen) < 0.4] = IGNORE
        if n > 1:
            labels[0] = IGNORE  # at least one ignored ...
        labels[-1] = vocab - 1  # ... and one target: the last class
    elif pattern == "all":
        labels[:] = IGNORE
    return labels


def _inputs(n, h, v, dtype, gen, bias=True, weight_grad=True):
    hidden = (torch.randn(n, h, generator=gen) * 2).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(dtype).requires_grad_(weight_grad)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype).requires_grad_(True) if bias else None
    return hidden, weight, b


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None and t.requires_grad], allow_unused=False)


def _close(actual, expected, rtol, atol_frac, what):
    atol = atol_frac * max(1.0, float(expected.abs().max())) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


SHAPES = [(37, 13, 101), (1, 7, 3), (130, 33, 257)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunk_rows", [1, 5, 64, None])
@pytest.mark.parametrize("pattern", ["some", "none", "all"])
@pytest.mark.parametrize("num_items", [None, "int", "tensor"])
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_fp32_matches_reference(shape, chunk_rows, pattern, num_items, head):
    """trainable: the recompute path (vocab-chunked backward); frozen head and bias: the path that
    computes grad_hidden in forward."""
    n, h, v = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, chunk_rows, pattern, num_items)).encode()))
    hidden, weight, bias = _inputs(n, h, v, torch.float32, gen, weight_grad=head == "trainable")
    if head == "frozen":
        bias.requires_grad_(False)
    labels = _labels(n, v, pattern, gen)
    valid = int((labels != IGNORE).sum())
    items = {None: None, "int": valid + 3, "tensor": torch.tensor(valid + 3)}[num_items]

    ref = _reference(hidden, weight, labels, bias, items)
    ours = linear_cross_entropy(hidden, weight, labels, bias=bias, num_items_in_batch=items, chunk_rows=chunk_rows)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    if pattern == "all" and num_items is None:
        assert torch.isnan(ref) and torch.isnan(ours)  # 0 / 0, as torch's mean cross-entropy
        # torch gives zero gradients then (never NaN), and so do we
        for g_ours, g_ref in zip(
            _grads(ours, (hidden, weight, bias)), _grads(ref, (hidden, weight, bias)), strict=False
        ):
            assert torch.equal(g_ref, torch.zeros_like(g_ref))
            assert torch.equal(g_ours, g_ref)
        return
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for name, g_ours, g_ref in zip(
        ("hidden", "weight", "bias"),
        _grads(ours, (hidden, weight, bias)),
        _grads(ref, (hidden, weight, bias)),
        strict=False,
    ):
        assert g_ours.dtype == g_ref.dtype and g_ours.shape == g_ref.shape
        _close(g_ours, g_ref, 1e-5, 1e-5, name)
        if pattern == "all":
            assert torch.equal(g_ours, torch.zeros_like(g_ours))


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_frozen_weight_and_no_bias(weight_grad, bias):
    gen = torch.Generator().manual_seed(3)
    hidden, weight, b = _inputs(29, 11, 53, torch.float32, gen, bias=bias, weight_grad=weight_grad)
    labels = _labels(29, 53, "some", gen)
    ref = _reference(hidden, weight, labels, b)
    ours = linear_cross_entropy(hidden, weight, labels, bias=b, chunk_rows=4)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    tensors = (hidden, weight, b)
    got, want = _grads(ours, tensors), _grads(ref, tensors)
    assert len(got) == len(want) == 1 + weight_grad + bias
    for g_ours, g_ref in zip(got, want, strict=False):
        _close(g_ours, g_ref, 1e-5, 1e-5, "grad")


@pytest.mark.parametrize("shape", [(37, 13, 101), (130, 33, 257)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunk_rows", [7, None])
@pytest.mark.parametrize("num_items", [None, "tensor"])
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_bf16_matches_reference(shape, chunk_rows, num_items, head):
    n, h, v = shape
    gen = torch.Generator().manual_seed(11)
    hidden, weight, bias = _inputs(n, h, v, torch.bfloat16, gen, weight_grad=head == "trainable")
    if head == "frozen":
        bias = bias.detach()
    labels = _labels(n, v, "some", gen)
    items = None if num_items is None else torch.tensor(int((labels != IGNORE).sum()) + 1)
    ref = _reference(hidden, weight, labels, bias, items)
    ours = linear_cross_entropy(hidden, weight, labels, bias=bias, num_items_in_batch=items, chunk_rows=chunk_rows)
    assert ours.dtype == torch.float32  # logits upcast, as transformers
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    for name, g_ours, g_ref in zip(
        ("hidden", "weight", "bias"),
        _grads(ours, (hidden, weight, bias)),
        _grads(ref, (hidden, weight, bias)),
        strict=False,
    ):
        assert g_ours.dtype == torch.bfloat16, name  # grads in the inputs' dtype
        _close(g_ours.float(), g_ref.float(), 2e-2, 1e-2, name)


def test_autocast_computes_like_linear_under_autocast():
    """fp32 master weights under torch.autocast(bf16) (the trainer's bf16 mode): the head GEMM runs
    in bf16 as nn.Linear's would, grads come back in fp32."""
    gen = torch.Generator().manual_seed(5)
    hidden, weight, bias = _inputs(41, 16, 97, torch.float32, gen)
    labels = _labels(41, 97, "some", gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(hidden, weight, labels, bias)
        ours = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_rows=6)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    fp32 = _reference(hidden, weight, labels, bias)
    assert float((ours - fp32).detach().abs()) > 1e-6  # it really ran in bf16 (else this test proves nothing)
    for name, g_ours, g_ref in zip(
        ("hidden", "weight", "bias"),
        _grads(ours, (hidden, weight, bias)),
        _grads(ref, (hidden, weight, bias)),
        strict=False,
    ):
        assert g_ours.dtype == torch.float32, name
        _close(g_ours, g_ref, 2e-2, 1e-2, name)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, IGNORE, 0, 8, IGNORE, 5])
    for items in (None, 7):
        def fn(h, w, b, items=items):
            return linear_cross_entropy(h, w, labels, bias=b, chunk_rows=3, num_items_in_batch=items)

        assert fn(hidden, weight, bias).dtype == torch.float64
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-7)


def test_ignored_rows_are_never_read():
    """Rows whose label is ignore_index are not multiplied with the head: NaN there changes nothing,
    and their gradient is exactly zero."""
    gen = torch.Generator().manual_seed(9)
    hidden, weight, bias = _inputs(23, 8, 31, torch.float32, gen)
    labels = _labels(23, 31, "some", gen)
    ignored = labels == IGNORE
    with torch.no_grad():
        poisoned = hidden.detach().clone()
        poisoned[ignored] = float("nan")
    poisoned.requires_grad_(True)
    ref = _reference(hidden, weight, labels, bias)
    ours = linear_cross_entropy(poisoned, weight, labels, bias=bias, chunk_rows=5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_h, g_w = torch.autograd.grad(ours, (poisoned, weight))
    r_h, r_w = torch.autograd.grad(ref, (hidden, weight))
    assert torch.equal(g_h[ignored], torch.zeros_like(g_h[ignored]))
    _close(g_h, r_h, 1e-5, 1e-5, "hidden")
    _close(g_w, r_w, 1e-5, 1e-5, "weight")


@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_backward_keeps_no_logits(head):
    """What autograd keeps. Trainable head: hidden, weight, bias, labels and two [labelled rows]
    vectors. Frozen head: the [labelled rows, H] gradient of the hidden states and the row index.
    Nothing with a vocab-sized dimension except the weight and bias themselves."""
    gen = torch.Generator().manual_seed(1)
    n, h, v = 50, 8, 211
    hidden, weight, bias = _inputs(n, h, v, torch.float32, gen, weight_grad=head == "trainable")
    if head == "frozen":
        bias = bias.detach()
    labels = _labels(n, v, "some", gen)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_rows=8)
    loss.backward()
    n_valid = int((labels != IGNORE).sum())
    if head == "trainable":
        allowed = {(n, h), (v, h), (v,), (n_valid,), ()}
        assert sum(1 for s in saved if s == (v, h)) == 1
    else:
        allowed = {(n_valid, h), (n_valid,), ()}
    assert saved and set(saved) <= allowed, saved


def test_no_grad_forward():
    gen = torch.Generator().manual_seed(4)
    hidden, weight, bias = _inputs(17, 5, 23, torch.float32, gen, weight_grad=False)
    labels = _labels(17, 23, "some", gen)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_rows=3)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(hidden, weight, labels, bias).detach(), rtol=1e-5, atol=1e-6)


def test_ignore_index_and_int32_labels():
    gen = torch.Generator().manual_seed(2)
    hidden, weight, bias = _inputs(19, 6, 13, torch.float32, gen)
    labels = _labels(19, 13, "some", gen)
    labels[labels == IGNORE] = -1
    ref = _reference(hidden, weight, labels, bias, ignore_index=-1)
    ours = linear_cross_entropy(hidden, weight, labels.to(torch.int32), bias=bias, ignore_index=-1, chunk_rows=4)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_default_chunk_rows():
    assert default_chunk_rows(151936) == 104  # 104 x 151936 x 4 B = 60 MiB
    assert default_chunk_rows(151936, device="cuda") == 104
    assert default_chunk_rows(151936, device="cpu") == 440  # 255 MiB
    assert default_chunk_rows(151936, torch.float32, chunk_bytes=1) == 1
    assert default_chunk_rows(10) % 8 == 0


def test_argument_errors():
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    labels = torch.tensor([0, 1, IGNORE, 4])
    with pytest.raises(ValueError, match="^hidden"):
        linear_cross_entropy(h[None], w, labels)
    with pytest.raises(ValueError, match="^weight"):
        linear_cross_entropy(h, torch.randn(5, 4), labels)
    with pytest.raises(ValueError, match="^labels"):
        linear_cross_entropy(h, w, labels[:3])
    with pytest.raises(TypeError, match="^labels"):
        linear_cross_entropy(h, w, labels.float())
    with pytest.raises(ValueError, match="^bias"):
        linear_cross_entropy(h, w, labels, bias=torch.randn(4))
    with pytest.raises(ValueError, match="^chunk_rows"):
        linear_cross_entropy(h, w, labels, chunk_rows=0)
    with pytest.raises(ValueError, match="^labels: target ids"):
        linear_cross_entropy(h, w, torch.tensor([0, 5, IGNORE, 1]))
    with pytest.raises(ValueError, match="^labels: target ids"):
        linear_cross_entropy(h, w, torch.tensor([0, -2, IGNORE, 1]))
