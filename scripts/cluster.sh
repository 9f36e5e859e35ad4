#!/usr/bin/env bash
# A Temporal cluster on this machine (frontend, history, matching and worker as separate
# processes on their own PostgreSQL, frontend with mTLS): up | down | status.
# Builds the server with `go install` the first time (cached in ~/.cache/paysentinel).
#   bash scripts/cluster.sh up        # then: set -a; . ~/.local/share/paysentinel/cluster/cluster.env; set +a
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m paysentinel.cli cluster "$@"
