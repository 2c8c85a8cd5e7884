#!/usr/bin/env bash
# Test data that ships inside registry packages (no hub downloads):
# - pyradiomics 3.0.1 source distribution (BSD-3): real chest CTs data/lung1_image.nrrd, lung2_image.nrrd.
#   It only downloads with numpy/versioneer/setuptools/wheel present and without build isolation
#   (3.1.0 fails to build). Kept as the .tar.gz in the cache; tests extract the NRRDs they need.
# - ch2 / ch2bet brain MR come from the Debian package mricron-data (installed by bootstrap.sh).
# Cache: $AINODE_TEST_DATA or ~/.cache/dicom-ai-node/test-data
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${AINODE_TEST_DATA:-$HOME/.cache/dicom-ai-node/test-data}"
mkdir -p "$cache"
sdist="$cache/pyradiomics-3.0.1.tar.gz"
if [ ! -s "$sdist" ]; then
  echo "fetch-test-data: downloading the pyradiomics 3.0.1 sdist (chest CT test data) into $cache"
  .venv/bin/pip install -q numpy versioneer setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
  tmp="$(mktemp -d)"
  (cd "$tmp" && "$OLDPWD/.venv/bin/pip" download -q --no-deps --no-build-isolation pyradiomics==3.0.1 -d "$tmp" \
     2>&1 | grep -v "^WARNING: Location" || true)
  [ -s "$tmp/pyradiomics-3.0.1.tar.gz" ] || { echo "fetch-test-data: download failed" >&2; exit 1; }
  mv "$tmp/pyradiomics-3.0.1.tar.gz" "$sdist"
  rm -rf "$tmp"
fi
tar -tzf "$sdist" pyradiomics-3.0.1/data/lung1_image.nrrd pyradiomics-3.0.1/data/lung2_image.nrrd >/dev/null
echo "fetch-test-data: chest CTs ready ($sdist)"
[ -f /usr/share/mricron/templates/ch2.nii.gz ] || echo "fetch-test-data: ch2 missing: apt-get install mricron-data" >&2
