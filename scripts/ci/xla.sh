#!/usr/bin/env bash
# CI step: the XLA:CPU tests (tests_xla/) in the torch 2.9 + torch_xla 2.9 venv that scripts/xla_env.sh builds
# (idempotent: a ready venv is reused). Prints pytest's summary; exits non-zero when a test fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${XLA_VENV:-$ROOT/.venv-xla}"
# .ci/run sets XLA_CI=1. There, when xla_env.sh finds too little free disk (exit 75), the main suite has already run:
# its venv and pytest's temporary directories go to make room, and a machine still short skips these tests with a
# notice instead of failing the run.
start=$(date +%s)
rc=0; "$ROOT/scripts/xla_env.sh" "$VENV" || rc=$?
if (( rc == 75 )) && [[ "${XLA_CI:-}" == 1 ]]; then
  echo "xla: removing the main venv and pytest's temporary directories to make room"
  rm -rf "$ROOT/.venv" "${TMPDIR:-/tmp}/pytest-of-$(id -un)"
  rc=0; "$ROOT/scripts/xla_env.sh" "$VENV" || rc=$?
  if (( rc == 75 )); then
    echo "XLA:CPU TESTS NOT RUN: not enough free disk for their venv (the line above says how much)"
    exit 0
  fi
fi
(( rc == 0 )) || exit "$rc"
echo "xla venv ready in $(( $(date +%s) - start )) s"
cd "$ROOT"
export PYTHONPATH="$ROOT" PJRT_DEVICE=CPU OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE --durations=10 tests_xla "$@"
