#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for the UI end-to-end test (labelloop_tests/test_ui_e2e.py).
# Idempotent: returns at once when /usr/bin/chromium is already there. Needs root (as in CI) or sudo;
# never prompts (CI runs with no standard input). Playwright drives this binary through
# executable_path; no browser is ever downloaded by a test tool.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "install-browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "install-browser: need root (or sudo) to apt-get install chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# fonts-liberation: readable text in screenshots; the rest comes with chromium's dependencies.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium fonts-liberation </dev/null
/usr/bin/chromium --version
