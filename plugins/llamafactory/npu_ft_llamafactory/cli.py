"""``npu-ft lf-train``: patch LLaMA-Factory with npu-ft's ops, then run LLaMA-Factory's own ``train``.

    npu-ft lf-train CONFIG.yaml [key=value ...] [--allow-unpatched] [--counters FILE]
    npu-ft lf-train --install-hook [--site-dir DIR]     # enable NPU_FT_LLAMAFACTORY=1 for any launcher
    npu-ft lf-train --uninstall-hook [--site-dir DIR]
    npu-ft lf-train --status

Everything after CONFIG.yaml that is not one of the flags above goes to LLaMA-Factory unchanged
(``key=value`` overrides). The plugin's options come from ``NPU_FT_LF_FALLBACK``,
``NPU_FT_LF_FUSED_LOSS``, ``NPU_FT_LF_FUSED_KERNELS``, ``NPU_FT_LF_CHECKPOINT_POLICY`` and
``NPU_FT_LF_COUNTERS`` (the flags win); the same options reach LLaMA-Factory's torchrun workers
through those variables. Exit status 1 for
a bad variable, 2 for a clear setup error (LLaMA-Factory missing, unsupported version or model
without ``--allow-unpatched``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

from . import hook, lf_patch
from .options import ENV_ENABLE, NpuFtLlamaFactoryError, options_from_env, options_to_env

USAGE = __doc__.split("\n\n", 2)[1]


def _pop_flag(argv: list[str], flag: str) -> bool:
    if flag in argv:
        argv.remove(flag)
        return True
    return False


def _pop_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag:
            if i + 1 >= len(argv):
                raise SystemExit(f"npu-ft lf-train: {flag} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if a.startswith(flag + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def _would_launch_torchrun() -> bool:
    from llamafactory.extras.misc import get_device_count, is_env_enabled

    return is_env_enabled("FORCE_TORCHRUN") or is_env_enabled("USE_MCA") or get_device_count() > 1


def lf_train_main(argv: list[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    site_dir = _pop_value(argv, "--site-dir")
    if _pop_flag(argv, "--install-hook"):
        path = hook.install_pth(site_dir)
        print(f"installed {path}: NPU_FT_LLAMAFACTORY=1 now patches LLaMA-Factory in every process of "
              f"{sys.executable}")
        return 0
    if _pop_flag(argv, "--uninstall-hook"):
        path = hook.uninstall_pth(site_dir)
        print(f"removed {path}" if path else "no hook installed")
        return 0
    if _pop_flag(argv, "--status"):
        status = hook.hook_status()
        try:
            status["llamafactory"] = lf_patch.check_llamafactory()
        except NpuFtLlamaFactoryError as exc:
            status["llamafactory"] = str(exc)
        status["supported_llamafactory"] = list(lf_patch.SUPPORTED_LF_VERSIONS)
        print(json.dumps(status, indent=2))
        return 0
    allow_unpatched = _pop_flag(argv, "--allow-unpatched")
    counters = _pop_value(argv, "--counters")
    if not argv or argv[0].startswith("-"):
        print(f"npu-ft lf-train: expected a LLaMA-Factory CONFIG.yaml first\n{USAGE}", file=sys.stderr)
        return 2
    try:
        options = options_from_env()
    except NpuFtLlamaFactoryError as exc:
        print(f"npu-ft lf-train: error: {exc}", file=sys.stderr)
        return 1
    options = replace(options, fallback=options.fallback or allow_unpatched,
                      counters_path=os.path.abspath(counters) if counters else options.counters_path)
    os.environ.update(options_to_env(options))  # the same options in LLaMA-Factory's torchrun workers
    try:
        # counters are written below by the process that trains (this one, or each torchrun worker)
        info = lf_patch.apply_npu_ft_to_llamafactory(**replace(options, counters_path=None).as_kwargs())
    except NpuFtLlamaFactoryError as exc:  # LLaMA-Factory missing or an unsupported version: exit 1
        print(f"npu-ft lf-train: error: {exc}", file=sys.stderr)
        return 1
    workers = bool(info.get("patched")) and _would_launch_torchrun()
    if info.get("patched"):
        os.environ[ENV_ENABLE] = "1"  # torchrun workers patch themselves through the .pth hook
        if workers and not hook.hook_status()["installed"]:
            print("npu-ft lf-train: LLaMA-Factory would start torchrun workers, which are patched only through the "
                  "import hook; run `npu-ft lf-train --install-hook` once in this environment", file=sys.stderr)
            return 1
        print(lf_patch.startup_line(info), file=sys.stderr)
    from llamafactory.cli import main as lf_main

    sys.argv = ["llamafactory-cli", "train", *argv]
    try:
        lf_main()
    except NpuFtLlamaFactoryError as exc:
        print(f"npu-ft lf-train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if options.counters_path and not workers:
            lf_patch.write_counters(options.counters_path)
    return 0


def main() -> int:  # python -m npu_ft_llamafactory.cli
    return lf_train_main(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
