#!/usr/bin/env bash
# CI step: the XLA:CPU tests (tests_xla/) in the torch 2.9 + torch_xla 2.9 venv that scripts/xla_env.sh builds
# (idempotent: a ready venv is reused). Prints pytest's summary; exits non-zero when a test fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${XLA_VENV:-$ROOT/.venv-xla}"
# Free space: the venv is ~7.8 GB (torch 2.9 is PyPI's CUDA build) plus the largest wheel while it installs.
# .ci/run sets XLA_CI=1: there the main suite has already run, so its venv and pytest's temporary directories may
# go to make room, and a machine that still lacks the space skips these tests with a notice instead of failing.
NEED_MB="${XLA_NEED_MB:-9000}"
free_mb() { df -Pm "$1" | awk 'NR == 2 {print $4}'; }
VENV_FS="$(dirname "$VENV")"
if [[ ! -f "$VENV/.lit-longctx-xla-ready" ]]; then
  have=$(free_mb "$VENV_FS")
  if (( have < NEED_MB )) && [[ "${XLA_CI:-}" == 1 ]]; then
    echo "xla: $have MB free at $VENV_FS, $NEED_MB MB needed: removing the main venv and pytest's temporary directories"
    rm -rf "$ROOT/.venv" "${TMPDIR:-/tmp}/pytest-of-$(id -un)"
    have=$(free_mb "$VENV_FS")
  fi
  if (( have < NEED_MB )); then
    if [[ "${XLA_CI:-}" == 1 ]]; then
      echo "XLA:CPU TESTS NOT RUN: the torch 2.9 + torch_xla venv needs about $NEED_MB MB free at $VENV_FS; $have MB are"
      exit 0
    fi
    echo "error: the torch 2.9 + torch_xla venv needs about $NEED_MB MB free at $VENV_FS; $have MB are." \
      "Free some space, or set XLA_VENV=DIR on a larger disk" >&2
    exit 1
  fi
fi
start=$(date +%s)
"$ROOT/scripts/xla_env.sh" "$VENV"
echo "xla venv ready in $(( $(date +%s) - start )) s"
cd "$ROOT"
export PYTHONPATH="$ROOT" PJRT_DEVICE=CPU OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE --durations=10 tests_xla "$@"
