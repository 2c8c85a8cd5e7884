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
# Everything the tests need was installed above: a missing tool or data set fails its test instead of
# skipping it (tests/support/tools.py). -rs lists any skip with its reason.
export AINODE_STRICT_TOOLS=1
exec .venv/bin/python -m pytest -q -rs "$@"
