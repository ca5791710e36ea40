"""The native CPU kernels as an extension (npu_ft/csrc/cpu, built by ops/backends/cpu/_native.py):
built where a compiler is, never at import, once for concurrent first users, a torch fallback where
no compiler works; and ``import npu_ft`` registering the ops without probing devices.

Values against the reference kernels are tested in test_nf4.py (native and torch paths).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import npu_ft.ops  # noqa: F401
from npu_ft.ops import nf4
from npu_ft.ops.backends.cpu import _native

REPO = Path(__file__).resolve().parents[2]
BUILD_LINE = "building the native CPU kernels"


def _python(code: str, cache: Path | None, **env_extra: str) -> subprocess.Popen:
    """Start ``python -c code``; with ``cache``, that is its extension cache (nothing built there yet)."""
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), NPU_FT_CPU_NATIVE="1", **env_extra)
    if cache is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(cache)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)  # far above a build (~10-30 s): only catches a hang
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


def test_native_kernels_build_where_a_compiler_is():
    missing = _native._missing_tool()
    if missing:
        pytest.skip(f"no build tools here: {missing}")
    assert _native.native_ops() is not None, _native.unavailable_reason()
    assert _native.unavailable_reason() is None


@pytest.mark.parametrize("first", ["npu_ft", "torch"])
def test_import_defines_the_ops_without_probing_or_building(tmp_path, first):
    """``import npu_ft`` (as ``import bitsandbytes``) gives every op its schema, fake and reference
    kernels, autograd and cpu kernel, whether torch is imported before or after it; ``import npu_ft``
    alone imports no torch; nothing probes a device, imports a heavy library or builds, and neither
    ``npu-ft --help`` nor a config error builds anything."""
    code = f"""
        import sys
        if {first!r} == "npu_ft":
            import npu_ft
            assert "torch" not in sys.modules, "import npu_ft imported torch"
            import torch
        else:
            import torch
            import npu_ft
        ops = ["nf4_quantize", "nf4_dequantize", "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
               "lora_linear", "lora_linear_backward", "nf4_linear", "nf4_linear_backward"]
        for name in ops:
            op = getattr(torch.ops.npu_ft, name).default
            for key in ("CompositeExplicitAutograd", "CPU", "Meta"):
                assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)
        assert torch._C._dispatch_has_kernel_for_dispatch_key("npu_ft::lora_linear", "Autograd")
        assert torch.__spec__.loader is torch.__loader__ and type(torch.__loader__).__name__ == "SourceFileLoader"
        heavy = [m for m in ("transformers", "peft", "bitsandbytes", "triton", "torch_npu", "npu_ft.device",
                             "torch.utils.cpp_extension") if m in sys.modules]
        assert not heavy, heavy
        assert not hasattr(torch.ops, "npu_ft_cpu") or not hasattr(torch.ops.npu_ft_cpu, "nf4_quantize")
        from npu_ft.cli import main
        assert main(["--help"]) == 0
        assert main(["train", "no-such-recipe.yaml"]) == 1
        print("OK")
    """
    out, _ = _finish(_python(code, tmp_path / "cache"))
    assert out.strip().endswith("OK"), out
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_without_a_compiler_the_torch_path_runs_and_says_why(tmp_path):
    code = """
        import torch
        import npu_ft
        from npu_ft.ops import kernel_calls, nf4
        from npu_ft.ops.backends.cpu import _native
        w = torch.randn(33, 65, dtype=torch.bfloat16)
        packed, absmax = torch.ops.npu_ft.nf4_quantize(w, 64)
        ref_packed, ref_absmax = nf4.nf4_quantize_reference(w, 64)
        assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
        out = torch.ops.npu_ft.nf4_dequantize(packed, absmax, 64, [33, 65], torch.bfloat16)
        assert torch.equal(out, nf4.nf4_dequantize_reference(packed, absmax, 64, [33, 65], torch.bfloat16))
        assert kernel_calls("nf4_dequantize") == {"cpu": 1}
        assert _native.native_ops() is None
        print("REASON", _native.unavailable_reason())
    """
    out, err = _finish(_python(code, tmp_path / "cache", CXX=str(tmp_path / "no-such-c++")))
    assert "REASON RuntimeError: no C++ compiler" in out, out
    assert "native CPU kernels unavailable, using torch ops" in err, err


@pytest.mark.slow
def test_concurrent_first_use_builds_once(tmp_path):
    """Two processes needing the kernels at the same time on a machine without a build: one builds
    (under a file lock), the other waits and loads that build; both compute exact results."""
    if _native._missing_tool():
        pytest.skip(f"no build tools here: {_native._missing_tool()}")
    code = """
        import torch
        import npu_ft
        from npu_ft.ops import nf4
        from npu_ft.ops.backends.cpu import _native
        w = torch.randn(3, 1000, dtype=torch.float16)
        got = torch.ops.npu_ft.nf4_quantize(w, 64)
        assert _native.native_ops() is not None, _native.unavailable_reason()
        assert all(torch.equal(a, b) for a, b in zip(got, nf4.nf4_quantize_reference(w, 64)))
        print("OK")
    """
    cache = tmp_path / "cache"
    procs = [_python(code, cache) for _ in range(2)]
    results = [_finish(p) for p in procs]
    assert all(out.strip() == "OK" for out, _ in results), results
    assert sum(err.count(BUILD_LINE) for _, err in results) == 1, results
    builds = [p for p in cache.iterdir() if p.is_dir()]
    assert len(builds) == 1 and (builds[0] / "complete").exists(), builds


def test_build_key_follows_the_sources_and_flags(monkeypatch, tmp_path):
    key = _native.build_key()
    assert key == _native.build_key() and len(key) == 16
    monkeypatch.setenv("CXX", "clang++")
    assert _native.build_key() != key
    monkeypatch.delenv("CXX")
    for src in _native.SOURCE_DIR.iterdir():
        (tmp_path / src.name).write_bytes(src.read_bytes())
    monkeypatch.setattr(_native, "SOURCE_DIR", tmp_path)
    assert _native.build_key() == key
    with open(tmp_path / "nf4.cpp", "a") as f:
        f.write("\n// changed\n")
    assert _native.build_key() != key


def test_native_primitives_declare_what_they_write():
    """opcheck's schema test: the npu_ft_cpu primitives mutate exactly their (a!)/(b!) outputs."""
    ops = _native.native_ops()
    if ops is None:
        pytest.skip(f"native CPU kernels unavailable: {_native.unavailable_reason()}")
    w = torch.randn(7, 33, dtype=torch.bfloat16)
    n = w.numel()
    packed, absmax = torch.empty((n + 1) // 2, 1, dtype=torch.uint8), torch.empty(-(-n // 32))
    schema_only = ("test_schema",)
    torch.library.opcheck(ops.nf4_quantize.default, (w, nf4.nf4_bounds(), 32, packed, absmax), test_utils=schema_only)
    out = torch.empty(7, 33, dtype=torch.float16)
    torch.library.opcheck(ops.nf4_dequantize.default, (packed, absmax, nf4.nf4_code(), 32, out), test_utils=schema_only)
    code = nf4.dynamic_code_8bit()
    q, qabs = torch.empty(n, dtype=torch.uint8), torch.empty(-(-n // 64))
    lut = nf4._lut_8bit(code)
    torch.library.opcheck(ops.quantize_blockwise_8bit.default, (w, lut, 64, q, qabs), test_utils=schema_only)
    torch.library.opcheck(ops.dequantize_blockwise_8bit.default, (q, qabs, code, 64, torch.empty(n)),
                          test_utils=schema_only)


def test_native_primitives_reject_short_buffers():
    ops = _native.native_ops()
    if ops is None:
        pytest.skip(f"native CPU kernels unavailable: {_native.unavailable_reason()}")
    packed, absmax = nf4.nf4_quantize_reference(torch.randn(64), 64)
    with pytest.raises(RuntimeError, match="packed: expected at least 64 elements"):
        ops.nf4_dequantize(packed, absmax, nf4.nf4_code(), 64, torch.empty(128))
    with pytest.raises(RuntimeError, match="out: dtype Double not supported"):
        ops.nf4_dequantize(packed, absmax, nf4.nf4_code(), 64, torch.empty(64, dtype=torch.float64))


def test_npu_kernels_register_on_the_first_npu_call():
    """cuda / npu kernels are not registered at import; the first op call with an npu tensor
    registers them and is served by them (the fake npu device)."""
    code = """
        import torch
        import npu_ft
        from npu_ft.ops import kernel_calls, loaded_backends, lora, nf4
        from tests.fake_npu import FakeNpuUnavailable, load_fake_npu
        try:
            load_fake_npu()
        except FakeNpuUnavailable as exc:
            print("SKIP", exc)
            raise SystemExit(0)
        assert "npu" not in loaded_backends()
        w = torch.randn(40, 24)
        packed, absmax = torch.ops.npu_ft.nf4_quantize(w.to("npu"), 64)
        assert "npu" in loaded_backends() and kernel_calls("nf4_quantize") == {"npu": 1}, kernel_calls("nf4_quantize")
        assert torch.equal(packed.cpu(), nf4.nf4_quantize_reference(w, 64)[0])
        x = torch.randn(3, 24, device="npu", requires_grad=True)
        a = torch.randn(4, 24, device="npu", requires_grad=True)
        b = torch.randn(40, 4, device="npu", requires_grad=True)
        with torch.autograd.set_multithreading_enabled(False):  # no npu autograd thread left at exit
            lora.lora_linear(x, w.to("npu"), None, a, b, 0.5).sum().backward()
        assert kernel_calls("lora_linear") == {"npu": 1} and kernel_calls("lora_linear_backward") == {"npu": 1}
        print("OK")
    """
    out, _ = _finish(_python(code, None))  # the usual cache: the fake npu is built once per machine
    if out.startswith("SKIP"):
        pytest.skip(out)
    assert out.strip().endswith("OK"), out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_to_16_bits_matches_torch_over_every_exponent(dtype):
    """The native kernels' float32 -> bf16 / fp16 rounding (ties, subnormals, overflow, NaN) gives
    torch's bits: every sign / exponent / top-7-mantissa-bit prefix, with low bits at and around
    the rounding tie and at random."""
    ops = _native.native_ops()
    if ops is None:
        pytest.skip(f"native CPU kernels unavailable: {_native.unavailable_reason()}")
    prefixes = torch.arange(1 << 16, dtype=torch.int64) << 16
    gen = torch.Generator().manual_seed(0)
    low = [0x0000, 0x7FFF, 0x8000, 0x8001, 0x0FFF, 0x1000, 0x1001, 0x2000, 0xFFFF]
    low += torch.randint(0, 1 << 16, (3,), generator=gen).tolist()
    bits = torch.cat([prefixes | v for v in low])
    values = (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)  # the float32 patterns
    # dequantize_blockwise_8bit with every code 1.0: out = 1.0 * absmax[block], rounded to dtype
    code, q = torch.ones(256), torch.zeros(values.numel() * 64, dtype=torch.uint8)
    out = torch.empty(q.numel(), dtype=dtype)
    ops.dequantize_blockwise_8bit(q, values, code, 64, out)
    expected = values.to(dtype).repeat_interleave(64)
    same = (out.view(torch.int16) == expected.view(torch.int16)) | (out.isnan() & expected.isnan())
    assert bool(same.all()), values.repeat_interleave(64)[~same][:8]


def test_when_imported_runs_after_the_module_or_at_once(tmp_path, monkeypatch):
    """The post-import hook behind ``import npu_ft``: the callback runs once, right after the
    module's own code (which sees no callback yet), or at once if the module is already imported;
    the module keeps its own loader."""
    from npu_ft._import_hook import when_imported

    (tmp_path / "npu_ft_probe_module.py").write_text("import sys\nSEEN_AT_IMPORT = list(sys.modules['events'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    events: list[str] = []
    monkeypatch.setitem(sys.modules, "events", events)  # the module reads it while it runs
    when_imported("npu_ft_probe_module", lambda: events.append("hook"))
    assert events == []
    import npu_ft_probe_module  # noqa: E402

    try:
        assert npu_ft_probe_module.SEEN_AT_IMPORT == [] and events == ["hook"]
        assert type(npu_ft_probe_module.__loader__).__name__ == "SourceFileLoader"
        assert npu_ft_probe_module.__spec__.loader is npu_ft_probe_module.__loader__
        when_imported("npu_ft_probe_module", lambda: events.append("again"))
        assert events == ["hook", "again"]
        assert not any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path)
    finally:
        sys.modules.pop("npu_ft_probe_module", None)
