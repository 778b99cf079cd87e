#!/usr/bin/env bash
# Build llama.cpp's libraries with a GPU backend from the source that the pinned llama-cpp-python vendors,
# beside the CPU build pip installed, for koboldlite.py to load through LLAMA_CPP_LIB_PATH:
#
#   bash tools/build_llama_lib.sh vulkan [OUT]      (default OUT: .llama-vulkan/lib)
#   bash tools/build_llama_lib.sh cuda [OUT] [ARCH] (ARCH e.g. 90 for an H100/H200; default: the GPU's own)
#   LLAMA_CPP_LIB_PATH=OUT python3 koboldlite.py ...
#
# CUDA is built with ggml's dynamic backend loading (GGML_BACKEND_DL): the CPU and the CUDA backends are
# modules that koboldlite.py loads at start, and a machine without an NVIDIA driver runs on the CPU module.
# The Vulkan build links its backend in; with no usable Vulkan device it runs on the CPU as well.
set -euo pipefail
backend=${1:?usage: build_llama_lib.sh vulkan|cuda [OUT] [CUDA_ARCH]}
root=$(cd "$(dirname "$0")/.." && pwd)
case "$backend" in      # prerequisites first: name what is missing before anything is downloaded
  vulkan) ;;            # tools/vulkan_prereqs.sh installs or names them
  cuda)
    command -v nvcc >/dev/null || { echo "nvcc is missing: install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads, or Debian's nvidia-cuda-toolkit) and put its bin folder on PATH" >&2; exit 2; }
    found=""
    for toolkit in "$(dirname "$(dirname "$(realpath "$(command -v nvcc)")")")" ${CUDA_HOME:+"$CUDA_HOME"} \
                   /usr/local/cuda /usr/local/cuda-* /usr; do
      ls "$toolkit"/include/cublas_v2.h "$toolkit"/targets/*/include/cublas_v2.h >/dev/null 2>&1 && found=$toolkit
    done
    [ -n "$found" ] || { echo "cuBLAS is missing from the CUDA toolkit (llama.cpp's CUDA backend needs it; nvcc alone is not enough): install the toolkit's cuBLAS (the libcublas-dev / cuda-libraries-dev packages, or the full toolkit), or set CUDA_HOME to a toolkit that has it" >&2; exit 2; } ;;
  *) echo "unknown backend $backend: vulkan or cuda" >&2; exit 2 ;;
esac
command -v cmake >/dev/null && command -v ninja >/dev/null || { echo "cmake and ninja are missing: apt-get install cmake ninja-build (or pip install cmake ninja)" >&2; exit 2; }
out=$(realpath -m "${2:-$root/.llama-$backend/lib}")
pin=$(sed -n 's/^llama-cpp-python==//p' "$root/requirements.txt")
# The source and build tree live in a cache outside the checkout (a later build, or CI's fresh clone on the
# same machine, only relinks); a fresh machine builds once.
work="${KOBOLDLITE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/koboldlite}/llama-$pin-$backend"
mkdir -p "$work" "$out"
cd "$work"
[ -f "llama_cpp_python-$pin.tar.gz" ] || python3 -m pip download -q --no-binary :all: --no-deps -d . "llama-cpp-python==$pin"
[ -d "llama_cpp_python-$pin" ] || tar xzf "llama_cpp_python-$pin.tar.gz"
src="$work/llama_cpp_python-$pin/vendor/llama.cpp"
server=OFF
[ "${BUILD_SERVER:-0}" = 1 ] && server=ON
common=(-DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
        -DLLAMA_BUILD_TOOLS=$server -DLLAMA_BUILD_SERVER=$server -DBUILD_SHARED_LIBS=ON -G Ninja
        -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON)     # the libraries find each other where they are copied
case "$backend" in
  vulkan)
    # shellcheck disable=SC2207
    extra=($(bash "$root/tools/vulkan_prereqs.sh" "$work/vulkan-headers"))
    cmake -S "$src" -B "$work/build" "${common[@]}" -DGGML_VULKAN=ON "${extra[@]}" >&2 ;;
  cuda)
    arch=${3:-native}
    cmake -S "$src" -B "$work/build" "${common[@]}" -DGGML_CUDA=ON -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF \
      -DCMAKE_CUDA_ARCHITECTURES="$arch" >&2 ;;
esac
targets=(llama)
[ "$backend" = cuda ] && targets+=(ggml-cpu ggml-cuda)
# BUILD_SERVER=1: llama-server from the same tree too, the peer the GPU benchmark compares with (into OUT, beside
# the libraries it loads from its own folder).
[ "${BUILD_SERVER:-0}" = 1 ] && targets+=(llama-server)
cmake --build "$work/build" --target "${targets[@]}" -j "$(nproc)" >&2
cp -a "$work"/build/bin/*.so* "$out"/
[ "${BUILD_SERVER:-0}" = 1 ] && cp "$work/build/bin/llama-server" "$out/"
echo "$out"
