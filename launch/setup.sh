#!/usr/bin/env bash
# Create .venv (if missing) and install tp_infer into it. Usage: bash launch/setup.sh [test]
# torch is installed first and pinned: on these CPU machines 2.13.0 comes from local disk, where a bare
# requirement could pull a multi-GB CUDA build. On a GPU machine install your CUDA torch before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
.venv/bin/pip install -q -e ".${extras}"
