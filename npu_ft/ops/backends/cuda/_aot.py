"""Compile every Triton kernel of the cuda backend for a GPU target without a GPU.

``python -m npu_ft.ops.backends.cuda._aot [arch]`` (default 90, i.e. H100) runs Triton's full
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the ptxas bundled in the triton wheel) for
each kernel in the configurations the launchers use on a GPU. It catches what the interpreter does
not: types the GPU compiler rejects, unsupported ops, shared-memory overflow. It needs no CUDA
driver, but must run with ``TRITON_INTERPRET`` unset (under the interpreter ``@triton.jit`` builds
interpreter functions, not compilable ones), so tests run it in a subprocess.
"""

from __future__ import annotations

import os
import sys


def _signature(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types[name]
    return sig


def compile_all(arch: int = 90) -> list[str]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET to compile for a GPU target")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import adamw8bit, block_ops, lora, methods, nf4

    target = GPUTarget("cuda", arch, 32)
    done = []

    def build(fn, label, types, constexprs, **options):
        src = ASTSource(fn=fn, signature=_signature(fn, types, constexprs), constexprs=constexprs)
        kernel = triton.compile(src, target=target, options=options)
        done.append(f"{label} (shared {kernel.metadata.shared} B)")

    build(nf4._nf4_dequantize_kernel, "nf4_dequantize bf16",
          {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*bf16", "n": "i64"},
          {"BLOCKSIZE": 64, "BLOCK": 1024, "RNE_BF16": False})
    build(nf4._nf4_quantize_kernel, "nf4_quantize bf16",
          {"a_ptr": "*bf16", "bounds_ptr": "*fp32", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i64",
           "n_blocks": "i32", "blocksize": "i32"},
          {"ROWS": 64, "HALF": 32})
    build(nf4._quantize_blockwise_8bit_kernel, "quantize_blockwise_8bit fp32",
          {"a_ptr": "*fp32", "lut_ptr": "*u8", "q_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i32",
           "n_blocks": "i32", "blocksize": "i32"},
          {"ROWS": 16, "COLS": 256}, enable_fp_fusion=False)
    build(nf4._dequantize_blockwise_8bit_kernel, "dequantize_blockwise_8bit fp32",
          {"q_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
           "blocksize": "i32"},
          {"BLOCK": 1024, "RNE_BF16": False})

    ints = ["M", "N", "K1", "K2", "s_a1m", "s_a1k", "s_b1k", "s_b1n", "s_a2m", "s_a2k", "s_b2k", "s_b2n",
            "s_cm", "s_cn"]
    for dtype, ldtype, prec2 in (("bf16", "fp32", "ieee"), ("fp32", "fp32", "tf32")):
        types = {name: "i32" for name in ints}
        types.update({"a1_ptr": "*" + dtype, "b1_ptr": "*" + dtype, "a2_ptr": "*" + ldtype, "b2_ptr": "*" + ldtype,
                      "bias_ptr": "*" + dtype, "c_ptr": "*" + dtype, "scale2": "fp32"})
        torch_dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
        import torch

        cfg = lora._blocks(4096, 4096, 16, getattr(torch, torch_dtype))
        options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        constexprs = dict(HAS_BIAS=True, HAS_SECOND=True, UPCAST=False, RNE_BF16=False,
                          PRECISION1="tf32", PRECISION2=prec2, **cfg)
        build(lora._dual_gemm_kernel, f"dual_gemm {dtype} x {ldtype} LoRA", types, constexprs, **options)

    for dtype in ("fp32", "bf16"):
        types = {name: "*u8" for name in ("s1_ptr", "s2_ptr", "lut1_ptr", "lut2_ptr")}
        types.update({name: "*fp32" for name in ("a1_ptr", "a2_ptr", "code1_ptr", "code2_ptr")})
        types.update({"p_ptr": "*" + dtype, "g_ptr": "*" + dtype, "n": "i64", "n_blocks": "i64"})
        types.update({name: "fp32" for name in ("beta1", "alpha1", "beta2", "alpha2", "correction2", "eps", "decay",
                                                "step_size")})
        build(adamw8bit._adamw8bit_kernel, f"adamw8bit_update {dtype}", types,
              dict(APPLY_DECAY=True, BLOCKSIZE=256, ROWS=adamw8bit.ROWS, RNE_BF16=False), enable_fp_fusion=False)
    block_ops.compile_for_target(build)
    methods.compile_for_target(build)
    return done


if __name__ == "__main__":
    for line in compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90):
        print(line)
