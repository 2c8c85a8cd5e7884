#!/usr/bin/env bash
# The test command: installs what is missing, makes sure PostgreSQL is up, runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/ensure-postgres.sh
echo "lint: ruff check, ruff format --check, mypy --strict"
.venv/bin/ruff check dicom_ai_node tests benchmarks scripts
.venv/bin/ruff format --check -q dicom_ai_node tests benchmarks scripts
.venv/bin/mypy --strict dicom_ai_node
exec .venv/bin/python -m pytest -q "$@"
