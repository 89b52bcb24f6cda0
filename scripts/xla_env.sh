#!/usr/bin/env bash
# Create (idempotently) a separate venv for the XLA:CPU tests: torch 2.9.0 + torch_xla 2.9.0 + lightning + the
# project's pure-Python deps + pytest. Kept apart from the main venv because torch_xla 2.9 needs exactly torch 2.9.0.
# Usage: scripts/xla_env.sh [VENV_DIR]   (default: .venv-xla in the repo root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${XLA_VENV:-$ROOT/.venv-xla}}"
STAMP="$VENV/.lit-longctx-xla-ready"
# The project's runtime deps (not the project itself: tests put the checkout on PYTHONPATH) and the test tools;
# the torch pin keeps pip from replacing the torch that torch_xla was built against.
REQS=("torch==2.9.0" "lightning>=2.4" "torchmetrics>=1.3" "transformers>=4.45" "tokenizers>=0.19" "safetensors>=0.4"
  "sentencepiece>=0.2" "datasets>=2.19" "jsonargparse[signatures]>=4.27" "huggingface_hub>=0.24" numpy
  "matplotlib>=3.7" tqdm "peft>=0.10" "pytest>=8" "pytest-timeout>=2")
# the stamp records what was installed, so a changed list reinstalls
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "${REQS[*]}" ]] && "$VENV/bin/python" -c "import torch_xla" 2>/dev/null; then
  exit 0
fi
# Free space: the venv is ~7.8 GB (torch 2.9 is PyPI's CUDA build) plus the largest wheel while it installs (below).
# Short of it: one error line and exit status 75, which scripts/ci/xla.sh tells apart from a failed install.
NEED_MB="${XLA_NEED_MB:-9000}"
mkdir -p "$(dirname "$VENV")"
have=$(df -Pm "$(dirname "$VENV")" | awk 'NR == 2 {print $4}')
if (( have < NEED_MB )); then
  echo "error: the torch 2.9 + torch_xla venv needs about $NEED_MB MB free at $(dirname "$VENV"); $have MB are." \
    "Free some space, or give a VENV_DIR (or XLA_VENV) on a larger disk" >&2
  exit 75
fi
PY="${PYTHON:-python3}"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_install() {  # quiet: pip's notes about this machine's local indexes are noise in CI logs
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}
# One wheel per pip call: pip downloads every wheel of a call before it unpacks any, so installing torch's ~3.5 GB
# of CUDA wheels in one call needs that much free space on top of the ~7 GB venv; one at a time the extra is the
# largest single wheel (cudnn, ~0.7 GB). torch first without its dependencies, then each of them as its metadata
# lists them (pins and platform markers included) and also without dependencies (the CUDA wheels depend on each
# other unpinned: pip would fetch newer ones, then replace them with torch's pins), then torch_xla and the rest,
# whose call adds what is still missing (e.g. sympy's mpmath).
pip_install --no-cache-dir --no-deps "torch==2.9.0"
mapfile -t TORCH_DEPS < <("$VENV/bin/python" - <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for spec in requires("torch") or []:
    req = Requirement(spec)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        print(str(req).split(";")[0].strip())
PY
)
for dep in "${TORCH_DEPS[@]}"; do  # pip's notes that torch's other dependencies are not installed *yet* are noise
  pip_install --no-cache-dir --no-deps "$dep" | { grep -v -e "which is not installed" -e "dependency resolver does not" || true; }
done
pip_install --no-cache-dir "torch==2.9.0" "torch_xla==2.9.0"
pip_install --no-cache-dir "${REQS[@]}"
"$VENV/bin/python" -m pip check --disable-pip-version-check  # the wheels installed one by one agree (pins included)
"$VENV/bin/python" -c "import torch, torch_xla, lightning; assert torch.__version__.startswith('2.9.0'), torch.__version__"
echo "${REQS[*]}" > "$STAMP"
