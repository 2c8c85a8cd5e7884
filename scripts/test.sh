#!/usr/bin/env bash
# The test command: installs what is missing, makes sure PostgreSQL is up, runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/ensure-postgres.sh
echo "lint: ruff check, ruff format --check, mypy --strict, lint-imports"
.venv/bin/ruff check dicom_ai_node tests benchmarks scripts
.venv/bin/ruff format --check -q dicom_ai_node tests benchmarks scripts
.venv/bin/mypy --strict dicom_ai_node
# Tests and benchmarks too (pyproject.toml: they may call untyped libraries, the rest is --strict).
.venv/bin/mypy --strict tests benchmarks
# The import direction of docs/architecture.md (contracts in pyproject.toml, [tool.importlinter]).
.venv/bin/lint-imports --no-cache
# Everything the tests need was installed above: a missing tool or data set fails its test instead of
# skipping it (tests/support/tools.py). -rs lists any skip with its reason.
export AINODE_STRICT_TOOLS=1
exec .venv/bin/python -m pytest -q -rs "$@"
