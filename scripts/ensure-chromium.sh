#!/usr/bin/env bash
# Make sure a headless Chromium is available for the Web UI test: Debian's `chromium`
# package (Playwright drives it; Playwright's own browser download is never used).
# Idempotent. Prints the browser's path.
set -euo pipefail

find_browser() { command -v chromium || command -v chromium-browser || true; }

BROWSER="${PAYSENTINEL_CHROMIUM:-$(find_browser)}"
if [ -z "$BROWSER" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ensure-chromium: FAILED: chromium is not installed and installing it needs root" >&2
        echo "ensure-chromium: what to do: sudo apt-get install chromium, or set PAYSENTINEL_CHROMIUM" >&2
        exit 1
    fi
    echo "ensure-chromium: installing Debian's chromium package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
    BROWSER="$(find_browser)"
fi
[ -x "$BROWSER" ] || { echo "ensure-chromium: FAILED: $BROWSER is not an executable" >&2; exit 1; }
echo "$BROWSER"
