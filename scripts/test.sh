#!/usr/bin/env bash
# Installs everything the tests need, then runs them against real parts:
# Python packages, the Temporal CLI (found, downloaded, or built with `go install`
# and cached in ~/.cache/paysentinel), the Temporal server and its schema tool for the
# cluster tier (built with `go install` once, cached there too), Temporal's time-skipping
# test server (Java, from Maven Central), PostgreSQL on 127.0.0.1:5432 (its server
# programs also run Temporal's own instance), and Debian's
# chromium for the test that drives the Temporal Web UI.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k webhook
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

echo "==> Python packages"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[test]'

echo "==> Lint, format and types (ruff, mypy: settings in pyproject.toml)"
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
"$PYTHON" -m mypy

echo "==> Temporal CLI"
"$PYTHON" -m paysentinel.cli temporal-cli

echo "==> Temporal server (the cluster tier, tests/test_cluster.py)"
"$PYTHON" -m paysentinel.cli cluster build

echo "==> Temporal time-skipping test server (for the tests of long timers)"
bash scripts/ensure-test-server.sh

echo "==> PostgreSQL"
bash scripts/ensure-postgres.sh

echo "==> Chromium (for the Web UI test)"
bash scripts/ensure-chromium.sh

echo "==> Tests"
# Test files run in parallel, each file whole in one pytest worker (each worker has its own
# Temporal dev server, system and database). PAYSENTINEL_TEST_WORKERS=0 runs them one by one.
exec "$PYTHON" -m pytest -n "${PAYSENTINEL_TEST_WORKERS:-3}" --dist loadfile "$@"
