#!/usr/bin/env bash
# CI step: the XLA:CPU tests (tests_xla/) in the torch 2.9 + torch_xla 2.9 venv that scripts/xla_env.sh builds
# (idempotent: a ready venv is reused). Prints pytest's summary; exits non-zero when a test fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${XLA_VENV:-$ROOT/.venv-xla}"
start=$(date +%s)
"$ROOT/scripts/xla_env.sh" "$VENV"
echo "xla venv ready in $(( $(date +%s) - start )) s"
cd "$ROOT"
export PYTHONPATH="$ROOT" PJRT_DEVICE=CPU OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE --durations=10 tests_xla "$@"
