"""``npu-ft lf-train``: patch LLaMA-Factory with npu-ft's ops, then run LLaMA-Factory's own ``train``.

    npu-ft lf-train CONFIG.yaml [key=value ...] [--allow-unpatched] [--counters FILE]
    npu-ft lf-train --install-hook [--site-dir DIR]     # enable NPU_FT_LLAMAFACTORY=1 for any launcher
    npu-ft lf-train --uninstall-hook [--site-dir DIR]
    npu-ft lf-train --status

Everything after CONFIG.yaml that is not one of the flags above goes to LLaMA-Factory unchanged
(``key=value`` overrides). Exit status 2 for a clear setup error (LLaMA-Factory missing, unsupported
version or model without ``--allow-unpatched``).
"""

from __future__ import annotations

import json
import os
import sys

from . import hook, lf_patch

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
        except lf_patch.NpuFtLlamaFactoryError as exc:
            status["llamafactory"] = str(exc)
        status["supported_llamafactory"] = list(lf_patch.SUPPORTED_LF_VERSIONS)
        print(json.dumps(status, indent=2))
        return 0
    fallback = _pop_flag(argv, "--allow-unpatched") or lf_patch.fallback_requested()
    counters = _pop_value(argv, "--counters")
    if counters:
        os.environ[lf_patch.ENV_COUNTERS] = os.path.abspath(counters)
    if not argv or argv[0].startswith("-"):
        print(f"npu-ft lf-train: expected a LLaMA-Factory CONFIG.yaml first\n{USAGE}", file=sys.stderr)
        return 2
    try:
        info = lf_patch.apply_npu_ft_to_llamafactory(fallback=fallback)
    except lf_patch.NpuFtLlamaFactoryError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if fallback:
        os.environ[lf_patch.ENV_FALLBACK] = "1"  # same choice in torchrun workers
    if info.get("patched"):
        os.environ[lf_patch.ENV_ENABLE] = "1"  # torchrun workers patch themselves through the .pth hook
        if _would_launch_torchrun() and not hook.hook_status()["installed"]:
            print("npu-ft lf-train: LLaMA-Factory would start torchrun workers, which are patched only through the "
                  "import hook; run `npu-ft lf-train --install-hook` once in this environment", file=sys.stderr)
            return 2
        print(f"[npu-ft] LLaMA-Factory {info['llamafactory']} patched: PEFT LoRA -> npu_ft::lora_linear, "
              "bitsandbytes 4-bit -> npu-ft NF4", file=sys.stderr)
    from llamafactory.cli import main as lf_main

    sys.argv = ["llamafactory-cli", "train", *argv]
    try:
        lf_main()
    except lf_patch.NpuFtLlamaFactoryError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    finally:
        lf_patch.write_counters()
    return 0


def main() -> int:  # python -m npu_ft_llamafactory.cli
    return lf_train_main(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
