#!/usr/bin/env bash
# Everything the tests need on a fresh Debian machine: the Python packages, and
# Debian's Chromium for the browser tests of embedded_ui/ (Playwright drives it;
# it never downloads a browser of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -r requirements-dev.txt
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  $sudo apt-get install -y chromium
fi
