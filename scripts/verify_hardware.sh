#!/usr/bin/env bash
# Verify this machine's device in one go (scripts/verify_hardware.py): npu-ft doctor, the cuda/ascend marked
# tests, the op micro-benchmarks and the smoke suite; writes a dated record under
# bench/results/<device>/ and a row of the verification matrix in docs/devices.md.
#
#   scripts/verify_hardware.sh                  # the best device here (npu > cuda > cpu)
#   scripts/verify_hardware.sh --device npu
#   scripts/verify_hardware.sh --quick --no-matrix --out /tmp/verify   # what CI runs on CPU
#
# On a machine without an accelerator the hardware parts are skipped and the record says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
exec "$PY" scripts/verify_hardware.py "$@"
