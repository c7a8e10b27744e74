#!/usr/bin/env bash
# The whole check: install, lint, format check, test suite. Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "$@"
