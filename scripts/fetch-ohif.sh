#!/usr/bin/env bash
# The OHIF viewer for the viewer end-to-end test (tests/e2e/test_ohif_viewer.py), from the npm registry:
# - @ohif/app 3.13.2: its npm package ships the prebuilt web app in dist/ (pinned: npm picks 3.12.x on
#   Node 20 otherwise); unpacked to $cache/dist.
# - playwright-core: drives Debian's chromium (apt-get install chromium). No browser downloads here:
#   never `npx playwright install`.
# Cache: $AINODE_OHIF_DIR or ~/.cache/dicom-ai-node/ohif. Idempotent: does nothing when both are there.
set -euo pipefail
OHIF_VERSION="3.13.2"
PLAYWRIGHT_CORE_VERSION="1.65.1"
cache="${AINODE_OHIF_DIR:-$HOME/.cache/dicom-ai-node/ohif}"
mkdir -p "$cache"
command -v npm >/dev/null || { echo "fetch-ohif: npm not found: apt-get install npm" >&2; exit 1; }

stamp="$cache/dist/.ohif-app-$OHIF_VERSION"
if [ ! -f "$stamp" ]; then
  echo "fetch-ohif: fetching @ohif/app@$OHIF_VERSION (prebuilt dist/) into $cache"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  tar -xzf "$tmp"/ohif-app-"$OHIF_VERSION".tgz -C "$tmp" package/dist
  [ -f "$tmp/package/dist/index.html" ] || { echo "fetch-ohif: no dist/index.html in the package" >&2; exit 1; }
  rm -rf "$cache/dist"
  mv "$tmp/package/dist" "$cache/dist"
  touch "$stamp"
fi

if [ ! -f "$cache/node_modules/playwright-core/package.json" ] ||
   ! grep -q "\"version\": \"$PLAYWRIGHT_CORE_VERSION\"" "$cache/node_modules/playwright-core/package.json"; then
  echo "fetch-ohif: installing playwright-core@$PLAYWRIGHT_CORE_VERSION into $cache"
  [ -f "$cache/package.json" ] || echo '{"name": "ainode-ohif-driver", "private": true}' > "$cache/package.json"
  # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing, but make sure of it.
  (cd "$cache" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund \
     "playwright-core@$PLAYWRIGHT_CORE_VERSION")
fi

echo "fetch-ohif: OHIF $OHIF_VERSION ready ($cache/dist), playwright-core in $cache/node_modules"
command -v chromium >/dev/null || echo "fetch-ohif: chromium missing: apt-get install chromium" >&2
