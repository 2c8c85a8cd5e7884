#!/usr/bin/env bash
# Run Debian's Orthanc (apt-get install orthanc orthanc-dicomweb) natively for development and tests:
# its own storage directory, loopback only, DICOMweb on, Lua auto-forward of stable series to the AI node.
#
# Usage: orthanc-dev/start-orthanc.sh [options]
#   --http-port N    HTTP port            (env ORTHANC_HTTP_PORT; default: a free port)
#   --dicom-port N   DICOM port           (env ORTHANC_DICOM_PORT; default: a free port)
#   --aet AET        Orthanc's AE title   (env ORTHANC_AET; default ORTHANC)
#   --node-aet AET   the AI node's AE     (env NODE_AET; default AINODE)
#   --node-port N    the AI node's port   (env NODE_PORT; default 11112)
#   --stable-age S   seconds of quiet before a series is stable (env ORTHANC_STABLE_AGE; default 2)
#   --dir DIR        storage + config + log directory (env ORTHANC_DIR; default: a fresh temp dir)
#   --background     return once Orthanc answers; its PID goes to DIR/orthanc.pid (or --pid-file)
#   --pid-file FILE  where --background writes the PID
# Stop it with: kill "$(cat DIR/orthanc.pid)"   (SIGTERM; Orthanc takes ~5 s to exit)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
orthanc_bin="${ORTHANC_BIN:-/usr/sbin/Orthanc}"
dicomweb_plugin="${ORTHANC_DICOMWEB_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}"

http_port="${ORTHANC_HTTP_PORT:-}"
dicom_port="${ORTHANC_DICOM_PORT:-}"
aet="${ORTHANC_AET:-ORTHANC}"
node_aet="${NODE_AET:-AINODE}"
node_port="${NODE_PORT:-11112}"
stable_age="${ORTHANC_STABLE_AGE:-2}"
dir="${ORTHANC_DIR:-}"
background=0
pid_file=""

die() { echo "start-orthanc: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --http-port) http_port="$2"; shift 2 ;;
    --dicom-port) dicom_port="$2"; shift 2 ;;
    --aet) aet="$2"; shift 2 ;;
    --node-aet) node_aet="$2"; shift 2 ;;
    --node-port) node_port="$2"; shift 2 ;;
    --stable-age) stable_age="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --background) background=1; shift ;;
    --pid-file) pid_file="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

[[ -x "$orthanc_bin" ]] || die "$orthanc_bin not found: apt-get install orthanc orthanc-dicomweb"
[[ -f "$dicomweb_plugin" ]] || die "$dicomweb_plugin not found: apt-get install orthanc-dicomweb"

# PS3.5 6.2 AE title: 1-16 printable characters, no backslash; quotes would break the JSON we render.
ae_ok() { [[ "$1" =~ ^[A-Za-z0-9\ _.+-]{1,16}$ ]]; }
ae_ok "$aet" || die "invalid Orthanc AE title: $aet"
ae_ok "$node_aet" || die "invalid node AE title: $node_aet"
for n in "$node_port" "$stable_age" ${http_port:+"$http_port"} ${dicom_port:+"$dicom_port"}; do
  [[ "$n" =~ ^[0-9]+$ ]] || die "not a number: $n"
done

# A free loopback port: bind port 0 and let the kernel choose (a small race, fine for dev and tests).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
[[ -n "$http_port" ]] || http_port="$(free_port)"
[[ -n "$dicom_port" ]] || dicom_port="$(free_port)"

if [[ -z "$dir" ]]; then
  dir="$(mktemp -d -t orthanc-dev.XXXXXX)"
fi
mkdir -p "$dir/storage"
dir="$(cd "$dir" && pwd)"
[[ "$dir$here" != *[\"\\\|]* ]] || die "paths with quotes, backslashes or '|' are not supported: $dir"

config="$dir/orthanc.json"
sed -e "s|@ORTHANC_AET@|$aet|g" \
    -e "s|@STORAGE_DIR@|$dir/storage|g" \
    -e "s|@HTTP_PORT@|$http_port|g" \
    -e "s|@DICOM_PORT@|$dicom_port|g" \
    -e "s|@NODE_AET@|$node_aet|g" \
    -e "s|@NODE_PORT@|$node_port|g" \
    -e "s|@STABLE_AGE@|$stable_age|g" \
    -e "s|@DICOMWEB_PLUGIN@|$dicomweb_plugin|g" \
    -e "s|@LUA_SCRIPT@|$here/autoforward.lua|g" \
    "$here/orthanc.json.template" > "$config"
! grep -q '@[A-Z_]*@' "$config" || die "unrendered placeholder in $config"

log="$dir/orthanc.log"
# Debian's DCMTK leaves Nagle on: without TCP_NODELAY every C-STORE response waits ~45 ms.
TCP_NODELAY=1 "$orthanc_bin" "$config" >"$log" 2>&1 &
pid=$!

url="http://127.0.0.1:$http_port"
for _ in $(seq 1 300); do
  if curl -fsS -o /dev/null "$url/system" 2>/dev/null; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "start-orthanc: Orthanc exited during start; log tail:" >&2; tail -n 30 "$log" >&2; exit 1
  fi
  sleep 0.1
done
if ! curl -fsS -o /dev/null "$url/system" 2>/dev/null; then
  echo "start-orthanc: no answer from $url/system after 30 s; log tail:" >&2; tail -n 30 "$log" >&2
  kill "$pid" 2>/dev/null || true
  exit 1
fi

echo "Orthanc HTTP:  $url"
echo "DICOMweb:      $url/dicom-web/"
echo "DICOM:         $aet@127.0.0.1:$dicom_port"
echo "forwards to:   $node_aet@127.0.0.1:$node_port (stable age ${stable_age}s)"
echo "directory:     $dir (log: $log)"
echo "PID:           $pid"

if [[ "$background" -eq 1 ]]; then
  pid_file="${pid_file:-$dir/orthanc.pid}"
  echo "$pid" > "$pid_file"
  echo "pid file:      $pid_file"
  exit 0
fi

# Foreground: pass Ctrl-C / SIGTERM on to Orthanc and wait for it to finish.
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM
tail -n +1 -f "$log" --pid="$pid" &
wait "$pid" || true
wait "$pid" 2>/dev/null || true
