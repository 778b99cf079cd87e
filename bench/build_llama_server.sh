#!/usr/bin/env bash
# Bench only (tests never use it): build llama.cpp's own llama-server from the llama.cpp source that
# the pinned llama-cpp-python source distribution vendors, into bench/.llama-server/bin/.
# About 15 minutes on 2 cores. The benchmarks find it there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pin=$(sed -n 's/^llama-cpp-python==//p' "$here/../requirements.txt")
work="$here/.llama-server"
mkdir -p "$work"
cd "$work"
[ -f "llama_cpp_python-$pin.tar.gz" ] || python3 -m pip download --no-binary :all: --no-deps -d . "llama-cpp-python==$pin"
[ -d "llama_cpp_python-$pin" ] || tar xzf "llama_cpp_python-$pin.tar.gz"
cd "llama_cpp_python-$pin/vendor/llama.cpp"
cmake -B build -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF >/dev/null
cmake --build build --target llama-server -j "$(nproc)"
mkdir -p "$work/bin"
cp build/bin/llama-server "$work/bin/"
echo "$work/bin/llama-server"
