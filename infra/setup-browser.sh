#!/usr/bin/env bash
# Installs headless Chromium for the dashboard screenshot test (tests/test_dashboard.py).
# Debian/Ubuntu only; needs root (or sudo). Idempotent: does nothing when chromium is present.
set -euo pipefail
for bin in chromium chromium-browser google-chrome; do
  if command -v "$bin" >/dev/null 2>&1; then
    echo "browser ok: $(command -v "$bin")"; exit 0
  fi
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    # Not fatal: the dashboard screenshot tests then skip and say why.
    echo "browser: not root and no sudo; install chromium by hand to run the screenshot tests" >&2
    exit 0
  fi
  SUDO="sudo"
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "browser: no apt-get here; install chromium by hand to run the screenshot tests" >&2
  exit 0
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
chromium --version
