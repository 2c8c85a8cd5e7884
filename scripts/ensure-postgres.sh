#!/usr/bin/env bash
# Make sure a local PostgreSQL answers on 127.0.0.1:5432 (the contract tests run on it as well as SQLite).
set -uo pipefail
ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ready; then echo "postgres: running on 127.0.0.1:5432"; exit 0; fi
if command -v pg_ctlcluster >/dev/null 2>&1; then
  for version in $(ls /etc/postgresql 2>/dev/null); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  done
fi
for _ in $(seq 1 30); do ready && { echo "postgres: started on 127.0.0.1:5432"; exit 0; }; sleep 1; done
echo "postgres: NOT reachable on 127.0.0.1:5432 and could not be started; the PostgreSQL contract tests" \
     "will fail (set AINODE_SKIP_POSTGRES=1 to skip them knowingly)" >&2
exit 0
