#!/usr/bin/env bash
# The main job on the embedded default: installs what is missing, then runs `dicom-ai-node demo`.
#   bash scripts/demo.sh [--exit]       (--exit: stop everything once the results are in)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/dicom-ai-node demo "$@"
