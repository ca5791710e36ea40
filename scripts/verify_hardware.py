"""Verify a machine in one go, from an npu-ft checkout (it runs the checkout's tests and benchmarks)::

    python scripts/verify_hardware.py [--device npu] [--quick] [--no-matrix] [--out DIR]
    scripts/verify_hardware.sh [...]            # the same

Parts, each in its own process with a time limit, each passed / failed / skipped with the reason:

1. ``npu-ft doctor --device DEV``: every op against its reference on the device (pass/fail per op);
2. the device's marked tests (``pytest -m cuda`` / ``-m ascend``): skipped on CPU, said so;
3. the op micro-benchmarks (``bench/micro``, pytest-benchmark): npu-ft against PEFT / bitsandbytes,
   speedups per op;
4. the smoke suite (``bench/suites/smoke.yaml`` on the device): every method, loss parity, ratios.

It writes a dated record (``verify-<date>.json`` and ``.md``: device, driver / CANN, torch /
torch_npu versions, commit, pass/fail per op, ratios) under ``bench/results/<device>/`` and adds a
row to the verification matrix of ``docs/devices.md`` (between its markers). Exit code 0 when no
part failed, 1 otherwise, 2 for usage. ``--quick`` (CI on CPU) runs one micro-benchmark round and
the smoke suite's LoRA cases only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["MATRIX_BEGIN", "MATRIX_END", "add_matrix_row", "verify_main"]

ROOT = Path(__file__).resolve().parents[1]  # the checkout this script belongs to
MATRIX_BEGIN = "<!-- BEGIN VERIFICATION MATRIX (scripts/verify_hardware.py adds rows) -->"
MATRIX_END = "<!-- END VERIFICATION MATRIX -->"
MATRIX_HEADER = ("| date | device | name | driver / CANN | torch / torch_npu | npu-ft commit | doctor | device tests "
                 "| micro-bench speedups | smoke parity | record |\n|---|---|---|---|---|---|---|---|---|---|---|")
MARKERS = {"cuda": "cuda", "npu": "ascend"}


def _run(cmd: list[str], timeout_s: float, cwd: Path = ROOT) -> tuple[int | None, str]:
    """(exit code or None on timeout, the last lines of the output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
        return proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:g} s"


def _part(name: str, status: str, summary: str, **extra) -> dict:
    return {"part": name, "status": status, "summary": summary, **extra}


def _doctor(device: str, tmp: Path, timeout_s: float) -> dict:
    out = tmp / "doctor.json"
    rc, tail = _run([sys.executable, "-m", "npu_ft.cli", "doctor", "--device", device, "--json", str(out)], timeout_s)
    if not out.exists():
        return _part("doctor", "failed", f"no result (exit {rc}): {tail.strip().splitlines()[-1:]}")
    ops = json.loads(out.read_text())["results"]
    failed = [f"{r['op']} {r['dtype']}" for r in ops if not r["passed"]]
    return _part("doctor", "failed" if failed else "passed",
                 f"{len(ops) - len(failed)}/{len(ops)} ops pass" + (f"; FAIL: {', '.join(failed)}" if failed else ""),
                 ops=[{k: r[k] for k in ("op", "dtype", "kernel", "max_abs_error", "passed")} for r in ops])


def _device_tests(device: str, timeout_s: float) -> dict:
    marker = MARKERS.get(device)
    if marker is None:
        return _part("device tests", "skipped", f"no {'/'.join(MARKERS.values())} device here ({device}): the "
                                                "hardware-marked tests need one")
    rc, tail = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, "tests"], timeout_s)
    last = next((line for line in reversed(tail.splitlines()) if "passed" in line or "failed" in line
                 or "no tests ran" in line), tail.strip().splitlines()[-1:] or "")
    return _part("device tests", "passed" if rc == 0 else "failed", f"pytest -m {marker}: {str(last).strip('= ')}")


def _micro(quick: bool, tmp: Path, timeout_s: float) -> dict:
    out = tmp / "micro.json"
    rounds = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.000001", "--benchmark-warmup=off"] if quick else [
        "--benchmark-min-rounds=5", "--benchmark-max-time=2"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/micro", "--benchmark-only",
           f"--benchmark-json={out}", *rounds]
    if quick:
        cmd += ["-k", "attn or fp32"]  # lora_linear 896->896, NF4 dequantize to fp32
    rc, tail = _run(cmd, timeout_s)
    if not out.exists():
        return _part("micro-benchmarks", "failed", f"no result (exit {rc}): {tail.strip().splitlines()[-1:]}")
    sys.path.insert(0, str(ROOT / "bench" / "micro"))
    try:
        from ratios import ratio_rows  # bench/micro/ratios.py
    finally:
        sys.path.pop(0)
    records = [{"group": b["group"], "name": b["name"].split("[")[0].replace("test_", ""),
                "median": b["stats"]["median"], "extra_info": b.get("extra_info", {})}
               for b in json.loads(out.read_text())["benchmarks"]]
    rows = ratio_rows(records)
    speedups = {r["group"]: round(r["speedup"], 2) for r in rows}
    return _part("micro-benchmarks", "passed" if rc == 0 else "failed",
                 ", ".join(f"{g} {s}x" for g, s in speedups.items()) or "no pairs", speedups=speedups)


def _smoke(device: str, quick: bool, tmp: Path, timeout_s: float) -> dict:
    from npu_ft.config.yaml_io import load_yaml_file

    suite = load_yaml_file(ROOT / "bench" / "suites" / "smoke.yaml")
    suite.update(devices=[device], name=f"smoke-{device}")
    path = tmp / "smoke.yaml"
    path.write_text(json.dumps(suite))  # JSON is YAML
    cmd = [sys.executable, "-m", "npu_ft.cli", "bench", str(path), "--out", str(tmp / "smoke")]
    if quick:
        cmd += ["--only", "/lora/"]
    rc, tail = _run(cmd, timeout_s)
    parity_csv = tmp / "smoke" / "parity.csv"
    if not parity_csv.exists():
        return _part("smoke suite", "failed", f"no result (exit {rc}): {tail.strip().splitlines()[-1:]}")
    import pandas as pd

    par = pd.read_csv(parity_csv)
    rat = pd.read_csv(tmp / "smoke" / "ratios.csv") if (tmp / "smoke" / "ratios.csv").stat().st_size > 1 else None
    checks = par.to_dict(orient="records")
    fails = [f"{r['method']}: {r['compare']}" for r in checks if not r["pass"]]
    ratios = {} if rat is None else {r["ratio"]: round(float(r["tokens_per_s"]), 2) for r in rat.to_dict("records")}
    summary = f"parity {len(par) - len(fails)}/{len(par)} pass" + (f"; FAIL: {', '.join(fails)}" if fails else "")
    return _part("smoke suite", "passed" if rc == 0 and not fails else "failed", summary,
                 parity=checks, tokens_per_s_ratios=ratios)


def driver_info(device: str) -> str:
    """Driver / toolkit versions of the device (best effort, "" when unknown)."""
    parts = []
    if device == "cuda":
        import torch

        parts.append(f"CUDA {torch.version.cuda}")
        rc, out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], 30) if _which(
            "nvidia-smi") else (None, "")
        if rc == 0 and out.strip():
            parts.append(f"driver {out.strip().splitlines()[0]}")
    elif device == "npu":
        home = os.environ.get("ASCEND_TOOLKIT_HOME", "/usr/local/Ascend/ascend-toolkit/latest")
        for name in ("version.cfg", "compiler/version.info", "toolkit/version.info"):
            f = Path(home) / name
            if f.is_file():
                m = re.search(r"(?:version|Version)\s*[=:]\s*([\w.\-]+)", f.read_text(errors="replace"))
                if m:
                    parts.append(f"CANN {m.group(1)}")
                    break
        rc, out = _run(["npu-smi", "info", "-t", "board", "-i", "0"], 30) if _which("npu-smi") else (None, "")
        m = re.search(r"Software Version\s*:\s*(\S+)", out or "")
        if m:
            parts.append(f"driver {m.group(1)}")
    return ", ".join(parts)


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def add_matrix_row(doc: Path, row: str) -> None:
    """Append ``row`` to the verification matrix of ``doc`` (its table is created between the markers
    on first use); written through a staging file."""
    text = doc.read_text()
    if MATRIX_BEGIN not in text or MATRIX_END not in text:
        raise ValueError(f"{doc}: no verification matrix markers ({MATRIX_BEGIN} ... {MATRIX_END})")
    head, rest = text.split(MATRIX_BEGIN, 1)
    body, tail = rest.split(MATRIX_END, 1)
    lines = [line for line in body.strip().splitlines() if line.strip()]
    if not any(line.startswith("| date |") for line in lines):
        lines = MATRIX_HEADER.splitlines() + lines
    lines.append(row)
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(f"{head}{MATRIX_BEGIN}\n" + "\n".join(lines) + f"\n{MATRIX_END}{tail}")
    os.replace(tmp, doc)


def _record_md(record: dict) -> str:
    lines = [f"# npu-ft verification: {record['device']} ({record['device_name']}), {record['date']}", "",
             f"- driver / CANN: {record['driver'] or 'unknown'}",
             f"- torch {record['versions'].get('torch')}, torch_npu "
             f"{record['versions'].get('torch_npu') or 'not installed'}",
             f"- npu-ft commit {record['git_commit']}", f"- took {record['seconds']:.0f} s", "",
             "| part | status | summary |", "|---|---|---|"]
    lines += [f"| {p['part']} | {p['status'].upper()} | {p['summary']} |" for p in record["parts"]]
    ops = next((p.get("ops") for p in record["parts"] if p["part"] == "doctor"), None)
    if ops:
        lines += ["", "| op | dtype | kernel | max abs error | result |", "|---|---|---|---|---|"]
        lines += [f"| {o['op']} | {o['dtype']} | {o['kernel']} | {o['max_abs_error']:.3g} | "
                  f"{'PASS' if o['passed'] else 'FAIL'} |" for o in ops]
    return "\n".join(lines) + "\n"


def verify_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/verify_hardware.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | npu | auto (default: npu > cuda > cpu)")
    p.add_argument("--out", default=None, help="folder for the record (default: bench/results/<device>)")
    p.add_argument("--matrix", default=str(ROOT / "docs" / "devices.md"),
                   help="file with the verification matrix to add a row to (default: docs/devices.md)")
    p.add_argument("--no-matrix", action="store_true", help="do not add a matrix row")
    p.add_argument("--quick", action="store_true", help="one micro-benchmark round, the smoke suite's LoRA cases")
    p.add_argument("--part-timeout-s", type=float, default=600, help="time limit of each part (default 600)")
    args = p.parse_args(argv)

    from npu_ft.device import DeviceUnavailableError, select_device
    from npu_ft.env_info import git_commit, package_versions

    try:
        backend, _ = select_device(None if args.device == "auto" else args.device)
    except DeviceUnavailableError as exc:
        print(f"verify_hardware: {exc}", file=sys.stderr)
        return 1
    device = backend.name
    t0 = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = []
    with tempfile.TemporaryDirectory(prefix="npu_ft_verify_") as tmp_name:
        tmp = Path(tmp_name)
        for name, run in (("doctor", lambda: _doctor(device, tmp, args.part_timeout_s)),
                          ("device tests", lambda: _device_tests(device, args.part_timeout_s)),
                          ("micro-benchmarks", lambda: _micro(args.quick, tmp, args.part_timeout_s)),
                          ("smoke suite", lambda: _smoke(device, args.quick, tmp, args.part_timeout_s))):
            print(f"verify_hardware: {name} ...", flush=True)
            part = run()
            print(f"    {part['status']}: {part['summary']}", flush=True)
            parts.append(part)
    versions = package_versions(("torch", "torch_npu", "transformers", "peft", "bitsandbytes"))
    record = {"date": stamp, "device": device, "device_name": backend.device_name(), "driver": driver_info(device),
              "versions": versions, "git_commit": git_commit() or "unknown", "quick": args.quick,
              "seconds": time.time() - t0, "parts": parts}
    out = Path(args.out or ROOT / "bench" / "results" / device)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"verify-{time.strftime('%Y%m%d-%H%M%S')}"
    base.with_suffix(".json").write_text(json.dumps(record, indent=2))
    base.with_suffix(".md").write_text(_record_md(record))
    status = {q["part"]: q["status"] for q in parts}
    if not args.no_matrix:
        cell = {q["part"]: (q["status"] if q["status"] != "passed" else "pass") + (
            f" ({q['summary']})" if q["part"] != "device tests" or q["status"] != "skipped" else " (no device)")
            for q in parts}
        try:
            rel = base.with_suffix(".md").resolve().relative_to(ROOT)
        except ValueError:
            rel = base.with_suffix(".md")
        row = (f"| {stamp[:10]} | {device} | {record['device_name']} | {record['driver'] or '-'} | "
               f"{versions.get('torch')} / {versions.get('torch_npu') or '-'} | {record['git_commit'][:12]} | "
               f"{cell['doctor']} | {cell['device tests']} | {cell['micro-benchmarks']} | {cell['smoke suite']} | "
               f"`{rel}` |")
        try:
            add_matrix_row(Path(args.matrix), row.replace("\n", " "))
        except (OSError, ValueError) as exc:
            print(f"verify_hardware: matrix not updated: {exc}", file=sys.stderr)
    print(f"verify_hardware: record {base}.md ({time.time() - t0:.0f} s); "
          + ", ".join(f"{k}: {v}" for k, v in status.items()))
    return 1 if "failed" in status.values() else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(verify_main(sys.argv[1:]))
