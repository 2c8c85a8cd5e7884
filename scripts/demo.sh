#!/usr/bin/env bash
# The main job on the embedded default: installs what is missing, then runs scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
