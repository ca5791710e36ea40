"""Runs a suite: every case in a fresh process, repeats interleaved, failures recorded.

Order: for each repeat, every case once (the order reversed on odd repeats), so the npu-ft and
reference cases of one method run next to each other under the same machine load, and slow drift
of the machine does not favour one side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .measure import PROBE_ENV, tensor_increment
from .suite import BenchCase, Suite

RAW_FILE = "raw.jsonl"


def _print(msg: str) -> None:
    print(msg, flush=True)


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _project_paths() -> list[str]:
    """Folders on ``sys.path`` that are not the interpreter's standard library or site-packages."""
    import site
    import sysconfig

    library = {os.path.realpath(p) for p in (*sysconfig.get_paths().values(), *site.getsitepackages(),
                                             site.getusersitepackages()) if p}
    return [p for p in sys.path if p and os.path.isdir(p) and os.path.realpath(p) not in library
            and not any(part in ("site-packages", "dist-packages") for part in Path(p).parts)]


def run_case_subprocess(case: BenchCase, repeat: int = 0, env: dict | None = None,
                        python: str | None = None) -> dict:
    """Run ``case`` in a fresh Python process; always returns a result dict (status ok|failed)."""
    with tempfile.TemporaryDirectory(prefix="npu_ft_case_") as tmp:
        case_path = os.path.join(tmp, "case.json")
        out_path = os.path.join(tmp, "result.json")
        with open(case_path, "w") as f:
            json.dump(case.to_dict(), f)
        child_env = dict(os.environ if env is None else env)
        # the worker sees the project folders this process sees (custom implementations, a checkout
        # on the path), not this interpreter's own library folders
        paths = _project_paths()
        if child_env.get("PYTHONPATH"):
            paths.append(child_env["PYTHONPATH"])
        if paths:
            child_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
        child_env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        child_env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        cmd = [python or sys.executable, "-m", "npu_ft.bench.worker", case_path, out_path]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=case.timeout_s)
            rc, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, stderr = (
                None,
                (exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""),
            )
        wall = time.perf_counter() - t0
        result = None
        if os.path.exists(out_path):
            with open(out_path) as f:
                result = json.load(f)
        if result is None:
            if rc is None:
                error = f"timeout: no result after {case.timeout_s:g} s"
            elif rc < 0:
                name = _signal_name(rc)
                hint = " (likely out of memory: killed by the kernel)" if name == "SIGKILL" else ""
                error = f"crashed: process killed by {name}{hint}"
            else:
                error = f"crashed: process exited with code {rc} without a result"
            tail = (stderr or "").strip().splitlines()[-5:]
            if tail:
                error += " | " + " | ".join(tail)
            result = {"case": case.to_dict(), "status": "failed", "error": error}
    result["repeat"] = repeat
    result["process_wall_s"] = wall
    result.setdefault("case", case.to_dict())
    return result


def _check_out_folder(out: Path) -> None:
    """A run writes its files (:data:`npu_ft.bench.report.RUN_FILES`) into ``out``: refuse a folder
    holding any of those names that an earlier run did not write (no suite.json there), rather than
    overwrite a user's file."""
    from .report import RUN_FILES

    if not out.is_dir() or (out / "suite.json").is_file():
        return
    clash = [name for name in RUN_FILES if (out / name).exists()]
    if clash:
        raise ValueError(f"{out}: holds {', '.join(clash)}, not from an `npu-ft bench` run; choose another --out")


def run_suite(
    suite: Suite,
    out_dir: str | Path | None = None,
    repeats: int | None = None,
    only: str | None = None,
    progress: Callable[[str], None] | None = _print,
    env: dict | None = None,
    jobs: int = 1,
    skip: list[str] | tuple = (),
) -> list[dict]:
    """Run every case of ``suite`` ``repeats`` times; write ``raw.jsonl`` and the reports to ``out_dir``.

    ``only``: substring filter on case ids (e.g. "lora/" or "qwen2.5-0.5b"); ``skip``: substrings of
    case ids not to run. ``jobs`` > 1 runs that
    many case processes at once: peak memory stays per case (each process has its own), but timings
    then compete for the CPU, so use it for smoke runs only. Returns the raw results (one dict per
    case per repeat).
    """
    from .report import write_reports

    cases = [c for c in suite.cases if (not only or only in c.case_id) and not any(s in c.case_id for s in skip)]
    if not cases:
        raise ValueError(f"no case of suite {suite.name!r} matches {only!r}")
    n_rep = repeats or suite.repeats
    out = Path(out_dir) if out_dir else None
    raw_path = None
    if out:
        _check_out_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        raw_path = out / RAW_FILE
        raw_path.write_text("")
        from .report import suite_meta

        # written first, so `npu-ft bench report DIR` can rebuild the reports of an interrupted run
        (out / "suite.json").write_text(json.dumps(suite_meta(suite), indent=2))
    results = []
    total = n_rep * len(cases)
    schedule = [(rep, case) for rep in range(n_rep) for case in (cases if rep % 2 == 0 else list(reversed(cases)))]
    if jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run_case_subprocess, case, rep, env) for rep, case in schedule]
            done = (f.result() for f in futures)
            outcomes = list(zip(schedule, done, strict=False))
    else:
        outcomes = ((item, None) for item in schedule)
    for (rep, case), res in outcomes:
        if res is None:
            if progress:
                progress(f"[{len(results) + 1}/{total}] repeat {rep}: {case.case_id} ...")
            res = run_case_subprocess(case, repeat=rep, env=env)
        elif progress:
            progress(f"[{len(results) + 1}/{total}] repeat {rep}: {case.case_id}")
        results.append(res)
        if progress:
            if res["status"] == "ok":
                progress(
                    f"    ok: {res['tokens_per_s']:.1f} tok/s, peak {res['peak_mem_bytes'] / 2**20:.0f} MiB, "
                    f"loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}"
                )
            else:
                progress(f"    FAILED: {res['error'][:300]}")
        if raw_path:
            with open(raw_path, "a") as f:
                f.write(json.dumps(res) + "\n")
    if suite.memory_probe:
        results += _memory_probes(cases, env, raw_path, progress)
    if out:
        write_reports(results, suite, out)
    return results


def _memory_probes(cases: list[BenchCase], env: dict | None, raw_path: Path | None,
                   progress: Callable[[str], None] | None) -> list[dict]:
    """One more process per CPU case with glibc's mmap threshold fixed at its initial 128 KiB (glibc then
    never raises it, so every freed tensor leaves the resident set at once): its training increment
    minus the library pages it mapped (``file_rss_growth_bytes``) is the live tensors plus the runtime,
    what an accelerator's allocator reports. Marked ``memory_probe``; the report keeps it out of the
    timings (the fixed threshold costs ~25 % tokens/s)."""
    probes = []
    for case in (c for c in cases if c.device == "cpu"):
        if progress:
            progress(f"[memory probe] {case.case_id} ...")
        res = run_case_subprocess(case, repeat=-1, env={**(os.environ if env is None else env), **PROBE_ENV})
        res["memory_probe"] = True
        probes.append(res)
        if progress and res["status"] == "ok" and "file_rss_growth_bytes" in res:
            progress(f"    ok: tensors {tensor_increment(res) / 2**20:.0f} MiB")
        if raw_path:
            with open(raw_path, "a") as f:
                f.write(json.dumps(res) + "\n")
    return probes

