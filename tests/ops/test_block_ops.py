"""The decoder-block ops (npu_ft::rms_norm, rope, swiglu): the CPU kernels (native C++, and with
NPU_FT_CPU_NATIVE=0 the pure-torch reference; the public op through autograd) against the oracle (transformers'
formulas, torch autograd) on awkward shapes in fp32, bf16 and fp16 with the registry's tolerances;
opcheck; what each op keeps for backward; argument errors."""

from __future__ import annotations

import pytest
import torch

import npu_ft.ops
from npu_ft.ops import kernel_calls, reset_kernel_calls, tolerance
from npu_ft.ops import rms_norm as rn
from npu_ft.ops import rope as rp
from npu_ft.ops import swiglu as sw
from npu_ft.ops.backends.cpu import block_ops as cpu
from tests.ops.test_nf4 import cpu_path  # noqa: F401  (the cpu kernels through native code and through torch)

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _close(op: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == ref.shape, what
    tolerance(op, dtype).assert_close(got.float(), ref.float(), msg=lambda m: f"{what}: {m}")


def _oracle_grads(fn, inputs: dict, grads: tuple) -> tuple[tuple, dict]:
    """Outputs of ``fn(**inputs)`` and the gradients of the float32 oracle w.r.t. each input."""
    leaves = {k: v.detach().float().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward([o for o, g in zip(outs, grads, strict=True) if g is not None],
                            [g.float() for g in grads if g is not None])
    return tuple(o.detach() for o in outs), {k: v.grad for k, v in leaves.items() if v.grad is not None}


# ---------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------
# (leading dims, hidden): odd hidden sizes, one token, a long packed row, hidden 1, hidden % 16 != 0
NORM_SHAPES = [((1, 1), 37), ((3, 5), 129), ((2, 9), 896), ((1, 2049), 64), ((7,), 3), ((4,), 23), ((2, 3), 4867)]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("lead,hidden", NORM_SHAPES, ids=str)
def test_rms_norm_kernels_match_the_oracle(lead, hidden, dtype, residual, cpu_path):
    x = _randn(*lead, hidden, dtype=dtype, seed=hidden)
    res = _randn(*lead, hidden, dtype=dtype, seed=hidden + 1) if residual else None
    w = _randn(hidden, dtype=dtype, seed=hidden + 2, scale=0.5) + 1
    y, h, rstd = cpu.rms_norm_cpu(x, w, 1e-6, res)
    assert y.dtype == dtype and rstd.dtype == torch.float32 and rstd.shape == x.shape[:-1]
    gy = _randn(*lead, hidden, dtype=dtype, seed=3)
    gh = _randn(*lead, hidden, dtype=dtype, seed=4) if residual else None
    inputs = {"x": x, "weight": w} | ({"residual": res} if residual else {})
    (ref_y, ref_h), ref_grads = _oracle_grads(lambda **kw: rn.rms_norm_oracle(eps=1e-6, **kw), inputs, (gy, gh))
    _close("rms_norm", y, ref_y, dtype, "y")
    if residual:
        assert h.dtype == dtype
        _close("rms_norm", h, ref_h, dtype, "h = x + residual")
        assert torch.equal(h, x + res)  # rounded exactly as transformers' residual add
    else:
        assert h.numel() == 0
    saved = h if residual else x
    dx, dw = cpu.rms_norm_backward_cpu(gy, gh, saved, w, rstd, [True, True])
    _close("rms_norm_backward", dx, ref_grads["x"], dtype, "dx")
    _close("rms_norm_backward", dw, ref_grads["weight"], dtype, "dweight")
    if residual:
        _close("rms_norm_backward", dx, ref_grads["residual"], dtype, "dresidual")
    only_dw = cpu.rms_norm_backward_cpu(gy, gh, saved, w, rstd, [False, True])
    assert only_dw[0].numel() == 0 and torch.equal(only_dw[1], dw)


def test_rms_norm_promotes_like_transformers():
    """bf16 activations with an fp32 weight (upcast norms): y is fp32, as ``weight * x.to(bf16)``."""
    x, w = _randn(3, 7, 45, dtype=torch.bfloat16), _randn(45, scale=0.1) + 1
    x.requires_grad_(True)
    w.requires_grad_(True)
    y, h = rn.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32 and h is x
    ref, _ = rn.rms_norm_oracle(x.detach(), w.detach(), 1e-5)
    assert ref.dtype == torch.float32
    _close("rms_norm", y, ref, torch.bfloat16, "y")
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# rope
# ---------------------------------------------------------------------------------------------
def _cos_sin(position_ids: torch.Tensor, dim: int, dtype: torch.dtype, theta: float = 1e6):
    """transformers' default rotary embedding of ``position_ids [B, S]``: ``cos, sin [B, S, dim]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _heads(batch, heads, seq, dim, dtype, seed):
    """[B, heads, S, D] as transformers makes it: the [B, S, heads, D] projection, transposed."""
    return _randn(batch, seq, heads, dim, dtype=dtype, seed=seed).transpose(1, 2)


def _packed_positions(batch: int, lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).expand(batch, -1)


# (batch, q heads, kv heads, positions, head dim, per-batch cos/sin)
ROPE_CASES = [(1, 1, 1, 1, 2, False), (2, 14, 2, 7, 64, True), (1, 16, 8, 3, 128, False), (3, 4, 4, 5, 6, True),
              (1, 2, 1, 33, 66, False), (2, 3, 1, 1, 18, True)]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
def test_rope_kernels_match_the_oracle(case, dtype, cpu_path):
    batch, hq, hk, seq, dim, per_batch = case
    q, k = _heads(batch, hq, seq, dim, dtype, 1), _heads(batch, hk, seq, dim, dtype, 2)
    rows = batch if per_batch else 1
    positions = torch.arange(seq).expand(rows, -1) + torch.arange(rows)[:, None]  # a different offset per row
    cos, sin = _cos_sin(positions, dim, dtype)
    qo, ko = cpu.rope_cpu(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()  # the [B, S, H, D] layout is kept
    gq, gk = _randn(*qo.shape, dtype=dtype, seed=5), _randn(*ko.shape, dtype=dtype, seed=6)
    (rq, rk), grads = _oracle_grads(lambda q, k, cos, sin: rp.rope_oracle(q, k, cos, sin),
                                    {"q": q, "k": k, "cos": cos, "sin": sin}, (gq, gk))
    _close("rope", qo, rq, dtype, "q")
    _close("rope", ko, rk, dtype, "k")
    dq, dk = cpu.rope_backward_cpu(gq, gk, cos, sin)
    _close("rope_backward", dq, grads["q"], dtype, "dq")
    _close("rope_backward", dk, grads["k"], dtype, "dk")


def test_rope_long_packed_sequence_matches_transformers(cpu_path):
    """Three sequences packed into 2050 positions (position ids restarting), Qwen2.5-0.5B heads,
    cos/sin from transformers' own Qwen2RotaryEmbedding; fp32 is bit-exact with apply_rotary_pos_emb."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    config = Qwen2Config(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6)
    positions = _packed_positions(1, [1000, 1, 1049])
    q, k = _heads(1, 14, 2050, 64, torch.float32, 7), _heads(1, 2, 2050, 64, torch.float32, 8)
    rotary = Qwen2RotaryEmbedding(config)
    cos, sin = rotary(q, positions)
    qo, ko = rp.rope(q, k, cos, sin)
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(qo, rq) and torch.equal(ko, rk)
    # a restarted sequence is rotated exactly like the same tokens at the start of a row
    cos1, sin1 = rotary(q, torch.arange(1049)[None])
    alone, _ = rp.rope(q[:, :, 1001:], k[:, :, 1001:], cos1, sin1)
    assert torch.equal(alone, qo[:, :, 1001:])


# ---------------------------------------------------------------------------------------------
# swiglu
# ---------------------------------------------------------------------------------------------
SWIGLU_SHAPES = [(1,), (7,), (3, 17), (2, 5, 4867), (1, 1, 4864), (2, 9, 100)]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=str)
def test_swiglu_kernels_match_the_oracle(shape, dtype, cpu_path):
    gate, up = _randn(*shape, dtype=dtype, seed=11, scale=3), _randn(*shape, dtype=dtype, seed=12)
    out = cpu.swiglu_cpu(gate, up)
    grad = _randn(*shape, dtype=dtype, seed=13)
    (ref,), grads = _oracle_grads(sw.swiglu_oracle, {"gate": gate, "up": up}, (grad,))
    _close("swiglu", out, ref, dtype, "out")
    dgate, dup = cpu.swiglu_backward_cpu(grad, gate, up, [True, True])
    _close("swiglu_backward", dgate, grads["gate"], dtype, "dgate")
    _close("swiglu_backward", dup, grads["up"], dtype, "dup")
    only_up = cpu.swiglu_backward_cpu(grad, gate, up, [False, True])
    assert only_up[0].numel() == 0 and torch.equal(only_up[1], dup)


def test_swiglu_extreme_gates(cpu_path):
    """exp's range ends: large |gate| saturate as torch's silu does; inf and NaN propagate."""
    gate = torch.tensor([-200.0, -100.0, -88.5, -87.5, -20.0, 0.0, 20.0, 87.5, 88.5, 100.0, 200.0,
                         float("inf"), float("-inf"), float("nan")] * 2)
    up = torch.linspace(-2, 2, gate.numel())
    got, ref = cpu.swiglu_cpu(gate, up), torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-30, equal_nan=True)
    grad = torch.ones_like(gate)
    finite = gate.isfinite()
    dgate, dup = cpu.swiglu_backward_cpu(grad, gate, up, [True, True])
    _, grads = _oracle_grads(sw.swiglu_oracle, {"gate": gate[finite], "up": up[finite]}, (grad[finite],))
    torch.testing.assert_close(dgate[finite], grads["gate"], rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(dup[finite], grads["up"], rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------------------------------------------
# the public ops: autograd on the cpu kernel, opcheck, what backward keeps, errors
# ---------------------------------------------------------------------------------------------
def test_public_ops_run_the_cpu_kernels_through_autograd():
    reset_kernel_calls()
    x = _randn(2, 5, 33).requires_grad_(True)
    w = (_randn(33) + 1).requires_grad_(True)
    res = _randn(2, 5, 33).requires_grad_(True)
    y, h = rn.rms_norm(x, w, 1e-6, residual=res)
    (y.sum() + (h * h).sum()).backward()
    ref_y, ref_h = rn.rms_norm_oracle(x.detach(), w.detach(), 1e-6, res.detach())
    _close("rms_norm", y, ref_y, torch.float32, "y")
    assert torch.equal(x.grad, res.grad)  # the residual add passes the same gradient to both
    q, k = _heads(2, 4, 6, 16, torch.float32, 3).requires_grad_(True), _heads(2, 2, 6, 16, torch.float32, 4)
    cos, sin = _cos_sin(torch.arange(6)[None], 16, torch.float32)
    qo, ko = rp.rope(q, k.requires_grad_(True), cos, sin)
    (qo.sum() + ko.sum()).backward()
    gate, up = _randn(3, 8).requires_grad_(True), _randn(3, 8, seed=1).requires_grad_(True)
    sw.swiglu(gate, up).sum().backward()
    for op in ("rms_norm", "rms_norm_backward", "rope", "rope_backward", "swiglu", "swiglu_backward"):
        assert kernel_calls(op).get("cpu", 0) >= 1, (op, kernel_calls(op))
        assert kernel_calls(op).get("reference", 0) == 0, (op, kernel_calls(op))


def test_opcheck():
    x, res = _randn(3, 4, 19).requires_grad_(True), _randn(3, 4, 19, seed=1).requires_grad_(True)
    w = (_randn(19) + 1).requires_grad_(True)
    torch.library.opcheck(torch.ops.npu_ft.rms_norm.default, (x, w, 1e-6, res))
    torch.library.opcheck(torch.ops.npu_ft.rms_norm.default, (x, w, 1e-6, None))
    _, h, rstd = torch.ops.npu_ft.rms_norm(x.detach(), w.detach(), 1e-6, res.detach())
    torch.library.opcheck(torch.ops.npu_ft.rms_norm_backward.default,
                          (_randn(3, 4, 19, seed=2), _randn(3, 4, 19, seed=3), h, w.detach(), rstd, [True, True]))
    q, k = _heads(2, 3, 5, 8, torch.float32, 1), _heads(2, 1, 5, 8, torch.float32, 2)
    cos, sin = _cos_sin(torch.arange(5)[None], 8, torch.float32)
    torch.library.opcheck(torch.ops.npu_ft.rope.default, (q.requires_grad_(True), k.requires_grad_(True), cos, sin))
    torch.library.opcheck(torch.ops.npu_ft.rope_backward.default, (q.detach(), k.detach(), cos, sin))
    gate, up = _randn(4, 9).requires_grad_(True), _randn(4, 9, seed=1).requires_grad_(True)
    torch.library.opcheck(torch.ops.npu_ft.swiglu.default, (gate, up))
    torch.library.opcheck(torch.ops.npu_ft.swiglu_backward.default,
                          (_randn(4, 9, seed=2), gate.detach(), up.detach(), [True, False]))


def _saved_bytes(fn, inputs: list[torch.Tensor], owned: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for ``fn(*inputs)``'s backward, beyond ``owned`` storages (inputs,
    parameters and shared tensors that exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in owned}
    seen: set[int] = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen.add(ptr)
            pack.total += t.untyped_storage().nbytes()  # type: ignore[attr-defined]
        return t

    pack.total = 0  # type: ignore[attr-defined]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return pack.total  # type: ignore[attr-defined]


def test_what_backward_keeps():
    """rms_norm: its input and one float32 per row; rope: nothing per call (cos/sin are shared);
    swiglu: nothing beyond its inputs. transformers' chains keep more."""
    rows, hidden, inter = 64, 96, 160
    x, w = _randn(rows, hidden).requires_grad_(True), (_randn(hidden) + 1).requires_grad_(True)
    assert _saved_bytes(lambda a: rn.rms_norm(a, w, 1e-6)[0], [x], [x, w]) == rows * 4
    bf = x.detach().bfloat16().requires_grad_(True)
    wb = w.detach().bfloat16().requires_grad_(True)
    fused = _saved_bytes(lambda a: rn.rms_norm(a, wb, 1e-6)[0], [bf], [bf, wb])
    unfused = _saved_bytes(lambda a: rn.rms_norm_oracle(a, wb, 1e-6)[0], [bf], [bf, wb])
    assert fused == rows * 4 and unfused >= rows * hidden * 4 + rows * 4  # its fp32 copy of x, 1/rms, ...
    q, k = _heads(1, 4, 32, 16, torch.float32, 1).requires_grad_(True), _heads(1, 2, 32, 16, torch.float32, 2)
    k.requires_grad_(True)
    cos, sin = _cos_sin(torch.arange(32)[None], 16, torch.float32)
    assert _saved_bytes(lambda a, b: rp.rope(a, b, cos, sin), [q, k], [q, k, cos, sin]) == 0
    gate, up = _randn(rows, inter).requires_grad_(True), _randn(rows, inter, seed=1).requires_grad_(True)
    assert _saved_bytes(sw.swiglu, [gate, up], [gate, up]) == 0
    assert _saved_bytes(sw.swiglu_oracle, [gate, up], [gate, up]) == rows * inter * 4  # silu(gate)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: rn.rms_norm(torch.ones(2, 3, dtype=torch.int64), torch.ones(3), 1e-6), TypeError, "^x: dtype"),
        (lambda: rn.rms_norm(torch.ones(2, 3), torch.ones(4), 1e-6), ValueError, "^weight: length"),
        (lambda: rn.rms_norm(torch.ones(2, 3), torch.ones(3), -1.0), ValueError, "^eps"),
        (lambda: rn.rms_norm(torch.ones(2, 3), torch.ones(3), 1e-6, torch.ones(3, 3)), ValueError, "^residual: shape"),
        (lambda: rn.rms_norm(torch.ones(2, 3), torch.ones(3), 1e-6, torch.ones(2, 3).bfloat16()), TypeError,
         "^residual: dtype"),
        (lambda: rp.rope(torch.ones(1, 2, 3, 5), torch.ones(1, 2, 3, 5), torch.ones(1, 3, 5), torch.ones(1, 3, 5)),
         ValueError, "^q: head dim"),
        (lambda: rp.rope(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 2, 4), torch.ones(1, 3, 4), torch.ones(1, 3, 4)),
         ValueError, "^k: shape"),
        (lambda: rp.rope(torch.ones(2, 2, 3, 4), torch.ones(2, 1, 3, 4), torch.ones(3, 3, 4), torch.ones(3, 3, 4)),
         ValueError, "^cos: expected shape"),
        (lambda: rp.rope(torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4), torch.ones(1, 3, 4, requires_grad=True),
                         torch.ones(1, 3, 4)), ValueError, "^cos: gradients"),
        (lambda: rp.rope(torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4), torch.ones(1, 3, 4).double(),
                         torch.ones(1, 3, 4)), TypeError, "^cos: dtype"),
        (lambda: sw.swiglu(torch.ones(2, 3), torch.ones(3, 2)), ValueError, "^up: shape"),
        (lambda: sw.swiglu(torch.ones(2, 3), torch.ones(2, 3).half()), TypeError, "^up: dtype"),
        (lambda: sw.swiglu([1.0], torch.ones(1)), TypeError, "^gate: expected a torch.Tensor"),
    ],
)
def test_bad_arguments_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_tolerance_tables():
    for op in ("rms_norm", "rms_norm_backward", "rope", "rope_backward", "swiglu", "swiglu_backward"):
        for dtype in FLOATS:
            assert not tolerance(op, dtype).exact
    assert "rms_norm" in npu_ft.ops._registry.REGISTERED and "cpu" in npu_ft.ops._registry.REGISTERED["swiglu"]


@pytest.mark.parametrize("module,fn", [(rn, "rms_norm"), (rp, "rope"), (sw, "swiglu")])
def test_doctor_catches_a_wrong_block_op(monkeypatch, capsys, module, fn):
    """``npu-ft doctor`` compares each block op with the oracle: results off by 1e-3 fail its row."""
    from npu_ft import doctor

    real = getattr(module, fn)

    def off(*args, **kwargs):
        out = real(*args, **kwargs)
        return tuple(t * (1 + 1e-3) for t in out) if isinstance(out, tuple) else out * (1 + 1e-3)

    monkeypatch.setattr(module, fn, off)
    assert doctor.doctor_main(["--device", "cpu", "--dtype", "fp32"]) == 1
    failing = [line for line in capsys.readouterr().out.splitlines() if "FAIL" in line]
    assert len(failing) == 1 and failing[0].startswith(fn), failing
