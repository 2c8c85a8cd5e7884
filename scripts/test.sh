#!/usr/bin/env bash
# The test command: installs what is missing, makes sure PostgreSQL is up, runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/ensure-postgres.sh
exec .venv/bin/python -m pytest -q "$@"
