"""`npu-ft doctor`: run every op on a device against its pure-torch reference and print a table.

This is how a user proves a real box (an Ascend 910B node, a GPU) gives the results npu-ft's
reference kernels give. For each check, inputs are made on the CPU from a fixed seed. The
*reference* is the op's pure-torch oracle run on the CPU in float32 (for gradients: torch
autograd through that oracle). The *result* is the public op run on the chosen device in the
check's dtype. The kernel that served the call is read from the op registry's call counters, and
the tolerance from the op registry's table (``npu_ft.ops.tolerance``), which the op tests use too.

Exit code: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from npu_ft.ops._doctor_rows import BLOCKSIZE, RANK, W_SHAPE, X_SHAPE, compare_grads, linear_inputs, rand

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


#: printed under the table when bf16 / fp16 rows ran: why their errors are not zero
LOW_PRECISION_NOTE = (
    "\nReading the errors: every row is compared with the op's float32 reference on the CPU. A bf16 (fp16) row "
    "runs the op in that dtype, so its inputs and outputs carry 8 (11) significant bits: an error up to about 1% "
    "of the tensor's scale is the format's rounding, not a kernel fault, and the tolerance column allows exactly "
    "that. Rows marked 'exact' (nf4_quantize: the 4-bit codes and absmax) must match bit for bit in every dtype: "
    "the stored NF4 bytes are the same as bitsandbytes', whatever dtype the weights came from."
)


@dataclass
class CheckResult:
    op: str
    dtype: str
    shape: str
    kernel: str
    max_abs_error: float
    tolerance: str
    passed: bool
    error: str = ""


@dataclass
class Check:
    """One row of the table. ``run(device, dtype)`` returns {name: (result, reference)} pairs,
    compared with the op registry's tolerance of ``tolerance_op`` in the row's dtype."""

    op: str
    dtype: torch.dtype
    shape: str
    run: Callable[[torch.device, torch.dtype], dict]
    kernel_ops: tuple[str, ...]
    tolerance_op: str


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]



# -- the checks -----------------------------------------------------------------------------------

def _nf4_quantize(device, dtype):
    from npu_ft.ops import nf4

    weight = rand(torch.Generator().manual_seed(0), *W_SHAPE).to(dtype)
    ref_packed, ref_absmax = nf4.nf4_quantize_reference(weight, BLOCKSIZE)
    packed, absmax = torch.ops.npu_ft.nf4_quantize(weight.to(device), BLOCKSIZE)
    return {"packed": (packed.cpu().to(torch.int16), ref_packed.to(torch.int16)), "absmax": (absmax.cpu(), ref_absmax)}


def _nf4_dequantize(device, dtype):
    from npu_ft.ops import nf4

    weight = rand(torch.Generator().manual_seed(1), *W_SHAPE)
    packed, absmax = nf4.nf4_quantize_reference(weight, BLOCKSIZE)
    ref = nf4.nf4_dequantize_reference(packed, absmax, BLOCKSIZE, list(W_SHAPE), torch.float32)
    out = torch.ops.npu_ft.nf4_dequantize(packed.to(device), absmax.to(device), BLOCKSIZE, list(W_SHAPE), dtype)
    return {"weight": (out.cpu(), ref)}


def _blockwise_8bit(device, dtype):
    from npu_ft.ops import nf4

    values = rand(torch.Generator().manual_seed(2), 1000)  # 1000 = 3 blocks of 256 + a partial one
    code = nf4.dynamic_code_8bit()
    ref_q, ref_absmax = nf4.quantize_blockwise_8bit_reference(values, code, 256)
    q, absmax = torch.ops.npu_ft.quantize_blockwise_8bit(values.to(device), code.to(device), 256)
    ref = nf4.dequantize_blockwise_8bit_reference(ref_q, ref_absmax, code, 256, torch.float32)
    out = torch.ops.npu_ft.dequantize_blockwise_8bit(q, absmax, code.to(device), 256, dtype)
    return {"q": (q.cpu().to(torch.int16), ref_q.to(torch.int16)), "values": (out.cpu(), ref)}


def _lora_linear(device, dtype):
    from npu_ft.ops import lora

    t = linear_inputs(3)

    def ref_fn(x, lora_A, lora_B, weight, bias, scaling):
        y, _ = lora.lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, None)
        return y

    def op_fn(x, lora_A, lora_B, weight, bias, scaling):
        return lora.lora_linear(x, weight, bias, lora_A, lora_B, scaling)

    return compare_grads(
        device, dtype, op_fn, ref_fn,
        trainable={"x": t["x"], "lora_A": t["lora_A"], "lora_B": t["lora_B"]},
        fixed={"weight": t["weight"], "bias": t["bias"], "scaling": 2.0},
        grad=t["grad"],
    )


def _nf4_linear(device, dtype):
    from npu_ft.ops import lora, nf4

    t = linear_inputs(4)
    packed, state = nf4.quantize_nf4(t["weight"], blocksize=BLOCKSIZE, double_quant=True)
    absmax = state.absmax_fp32()

    def ref_fn(x, lora_A, lora_B, bias, scaling):
        y, _ = lora.nf4_linear_reference(x, packed, absmax, BLOCKSIZE, list(W_SHAPE), bias, lora_A, lora_B,
                                         scaling, None)
        return y

    dev_packed, dev_state = packed.to(device), state.to(device)

    def op_fn(x, lora_A, lora_B, bias, scaling):
        return lora.nf4_linear(x, dev_packed, dev_state, bias, lora_A, lora_B, scaling)

    return compare_grads(
        device,
        dtype,
        op_fn,
        ref_fn,
        trainable={"x": t["x"], "lora_A": t["lora_A"], "lora_B": t["lora_B"]},
        fixed={"bias": t["bias"], "scaling": 2.0},
        grad=t["grad"],
    )


#: the fused loss check: N rows (some unlabelled) x hidden H against a V-row head, in chunks of
#: _CE_CHUNK rows (N, V and the chunk deliberately not multiples of each other)
_CE_N, _CE_H, _CE_V, _CE_CHUNK = 37, 48, 1031, 8


def _linear_cross_entropy(device, dtype):
    from npu_ft.ops.linear_cross_entropy import linear_cross_entropy

    gen = torch.Generator().manual_seed(5)
    hidden, weight = rand(gen, _CE_N, _CE_H), rand(gen, _CE_V, _CE_H) / 4
    labels = torch.randint(0, _CE_V, (_CE_N,), generator=gen)
    labels[::3] = -100  # prompt rows

    def ref_fn(hidden, weight):
        return torch.nn.functional.cross_entropy(hidden.float() @ weight.float().T, labels, ignore_index=-100)

    def op_fn(hidden, weight):  # labels stay integer, on the device
        return linear_cross_entropy(hidden, weight, labels.to(hidden.device), chunk_rows=_CE_CHUNK)

    return compare_grads(
        device, dtype, op_fn, ref_fn, trainable={"hidden": hidden, "weight": weight}, fixed={}, grad=torch.tensor(1.0)
    )


#: the decoder-block checks: rows x hidden (odd), attention heads/positions/head dim, MLP width (odd)
_NORM_SHAPE, _ROPE_SHAPE, _MLP_SHAPE = (3, 37, 129), (2, 14, 2, 37, 64), (3, 37, 131)


def _flat(*tensors: torch.Tensor) -> torch.Tensor:
    """Several outputs as one vector (one backward with one gradient)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _rms_norm(device, dtype):
    from npu_ft.ops import rms_norm as rn

    gen = torch.Generator().manual_seed(6)
    x, res, w = rand(gen, *_NORM_SHAPE), rand(gen, *_NORM_SHAPE), 1 + rand(gen, _NORM_SHAPE[-1]) / 4

    def ref_fn(x, residual, weight):
        return _flat(*rn.rms_norm_oracle(x, weight, 1e-6, residual))

    def op_fn(x, residual, weight):  # y and h = x + residual (the next residual): both get a gradient
        return _flat(*rn.rms_norm(x, weight, 1e-6, residual))

    return compare_grads(device, dtype, op_fn, ref_fn, trainable={"x": x, "residual": res, "weight": w}, fixed={},
                          grad=rand(gen, 2 * x.numel()))


def _rope(device, dtype):
    from npu_ft.ops import rope as rp

    batch, hq, hk, seq, dim = _ROPE_SHAPE
    gen = torch.Generator().manual_seed(7)
    q, k = rand(gen, batch, seq, hq, dim).transpose(1, 2), rand(gen, batch, seq, hk, dim).transpose(1, 2)
    positions = torch.cat([torch.arange(20), torch.arange(seq - 20)]).expand(batch, -1)  # two packed sequences
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = positions[..., None].float() * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()

    def ref_fn(q, k, cos, sin):
        return _flat(*rp.rope_oracle(q, k, cos, sin))

    def op_fn(q, k, cos, sin):
        return _flat(*rp.rope(q, k, cos.to(q.dtype), sin.to(q.dtype)))

    return compare_grads(device, dtype, op_fn, ref_fn, trainable={"q": q, "k": k}, fixed={"cos": cos, "sin": sin},
                          grad=rand(gen, q.numel() + k.numel()))


def _swiglu(device, dtype):
    from npu_ft.ops import swiglu as sw

    gen = torch.Generator().manual_seed(8)
    gate, up = rand(gen, *_MLP_SHAPE) * 3, rand(gen, *_MLP_SHAPE)
    return compare_grads(device, dtype, sw.swiglu, sw.swiglu_oracle, trainable={"gate": gate, "up": up}, fixed={},
                          grad=rand(gen, *_MLP_SHAPE))


def build_checks(dtypes=(torch.float32, torch.bfloat16)) -> list[Check]:
    from npu_ft.ops import adamw8bit, dora, lora_fa

    shape_w, shape_x = "x".join(map(str, W_SHAPE)), "x".join(map(str, X_SHAPE))
    checks = []
    for dtype in dtypes:
        checks += [
            Check("nf4_quantize", dtype, f"{shape_w} bs{BLOCKSIZE}", _nf4_quantize, ("nf4_quantize",),
                  "nf4_quantize"),
            Check("nf4_dequantize", dtype, f"{shape_w} bs{BLOCKSIZE}", _nf4_dequantize, ("nf4_dequantize",),
                  "nf4_dequantize"),
            Check(
                "blockwise_8bit",
                dtype,
                "1000 bs256",
                _blockwise_8bit,
                ("quantize_blockwise_8bit", "dequantize_blockwise_8bit"),
                "dequantize_blockwise_8bit",
            ),
            Check(
                "lora_linear fwd+bwd",
                dtype,
                f"x {shape_x} W {shape_w} r{RANK}",
                _lora_linear,
                ("lora_linear", "lora_linear_backward"),
                "lora_linear_backward",
            ),
            Check(
                "nf4_linear fwd+bwd",
                dtype,
                f"x {shape_x} W {shape_w} r{RANK} dq",
                _nf4_linear,
                ("nf4_linear", "nf4_linear_backward"),
                "nf4_linear_backward",
            ),
            Check("rms_norm+residual fwd+bwd", dtype, "x".join(map(str, _NORM_SHAPE)), _rms_norm,
                  ("rms_norm", "rms_norm_backward"), "rms_norm_backward"),
            Check("rope fwd+bwd", dtype, "B{} q{} k{} S{} D{} packed".format(*_ROPE_SHAPE), _rope,
                  ("rope", "rope_backward"), "rope_backward"),
            Check("swiglu fwd+bwd", dtype, "x".join(map(str, _MLP_SHAPE)), _swiglu, ("swiglu", "swiglu_backward"),
                  "swiglu_backward"),
            Check(
                "linear_cross_entropy fwd+bwd",
                dtype,
                f"h {_CE_N}x{_CE_H} W {_CE_V}x{_CE_H} chunk{_CE_CHUNK}",
                _linear_cross_entropy,
                (),
                "linear_cross_entropy",
            ),
        ]
        checks += [Check(**spec) for spec in adamw8bit.doctor_checks((dtype,))]
        checks += [Check(**spec) for spec in dora.doctor_checks((dtype,)) + lora_fa.doctor_checks((dtype,))]
    return checks


# -- running --------------------------------------------------------------------------------------


def _kernel_summary(ops: tuple[str, ...]) -> str:
    from npu_ft.ops import kernel_calls

    if not ops:  # plain torch on the device (no torch.library op behind it)
        return "torch"
    used = []
    for op in ops:
        calls = kernel_calls(op)
        used.append(f"{op}:{'+'.join(sorted(calls)) or 'none'}")
    kernels = {part.split(":", 1)[1] for part in used}
    return kernels.pop() if len(kernels) == 1 else ", ".join(used)


def run_check(check: Check, device: torch.device) -> CheckResult:
    from npu_ft.ops import reset_kernel_calls, tolerance

    tol = tolerance(check.tolerance_op, check.dtype)
    reset_kernel_calls()
    try:
        pairs = check.run(device, check.dtype)
        worst, passed = 0.0, True
        for result, reference in pairs.values():
            result, reference = result.float(), reference.float()
            if result.shape != reference.shape:
                raise AssertionError(f"shape {tuple(result.shape)} != reference {tuple(reference.shape)}")
            err = float((result - reference).abs().max()) if result.numel() else 0.0
            worst = max(worst, err)
            passed &= tol.passes(result, reference)
        return CheckResult(
            check.op,
            _dtype_name(check.dtype),
            check.shape,
            _kernel_summary(check.kernel_ops),
            worst,
            tol.describe(),
            passed,
        )
    except Exception as exc:  # noqa: BLE001 - a failing op is a table row, not a crash
        return CheckResult(
            check.op,
            _dtype_name(check.dtype),
            check.shape,
            _kernel_summary(check.kernel_ops),
            float("nan"),
            tol.describe(),
            False,
            f"{type(exc).__name__}: {exc}",
        )


def format_table(results: list[CheckResult]) -> str:
    header = ["op", "dtype", "shape", "kernel", "max abs error", "tolerance", "result"]
    rows = [
        [
            r.op,
            r.dtype,
            r.shape,
            r.kernel,
            f"{r.max_abs_error:.3g}",
            r.tolerance,
            "PASS" if r.passed else f"FAIL {r.error}".strip(),
        ]
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def doctor_main(argv: list[str]) -> int:
    from npu_ft.cli_common import DEVICE_CHOICES

    parser = argparse.ArgumentParser(prog="npu-ft doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, choices=DEVICE_CHOICES,
                        help="default: $NPU_FT_DEVICE or auto (npu > cuda > cpu)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default fp32 and bf16")
    parser.add_argument("--json", metavar="FILE", help="also write the results and environment as JSON")
    args = parser.parse_args(argv)

    from npu_ft.device import select_device
    from npu_ft.env_info import environment_report

    backend, device = select_device(args.device)
    import npu_ft.ops as ops

    env = environment_report(backend.name)
    print(f"npu-ft doctor on {backend.name} ({backend.device_name()}), device {device}")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v))
    print(
        "kernels registered: "
        + ", ".join(
            f"{name}={'yes' if why is None else 'no (' + why + ')'}" for name, why in ops.BACKEND_STATUS.items()
        )
    )
    print()
    dtypes = tuple(DTYPES[d] for d in (args.dtype or ["fp32", "bf16"]))
    results = [run_check(check, device) for check in build_checks(dtypes)]
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    if any(d != torch.float32 for d in dtypes):
        print(LOW_PRECISION_NOTE)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": [asdict(r) for r in results]}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(doctor_main(sys.argv[1:]))
