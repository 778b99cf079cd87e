#!/usr/bin/env bash
# Everything the tests need on a fresh Debian machine: the Python packages, then
# Debian's Chromium (the browser tests of embedded_ui/; Playwright drives it and
# never downloads a browser of its own) and HAProxy (the scale-out tests).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -r requirements-dev.txt
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  $sudo apt-get install -y "${missing[@]}"
fi
