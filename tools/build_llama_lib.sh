#!/usr/bin/env bash
# Build llama.cpp's libraries from the source that the pinned llama-cpp-python vendors, for koboldlite.py (and the
# executables) to load through LLAMA_CPP_LIB_PATH or from beside the script:
#
#   bash tools/build_llama_lib.sh cpu [OUT]           (default OUT: .llama-cpu/lib)  every x86-64 CPU
#   bash tools/build_llama_lib.sh vulkan [OUT]        (default OUT: .llama-vulkan/lib)  and any GPU, through Vulkan
#   bash tools/build_llama_lib.sh cuda [OUT] [ARCH]   (ARCH e.g. 90 for an H100/H200; default: the GPU's own)
#   bash tools/build_llama_lib.sh noopenmp [OUT]      (default OUT: .llama-noopenmp/lib)  this CPU alone, ggml's own
#                                                      threads instead of OpenMP's, as macOS builds run them
#   LLAMA_CPP_LIB_PATH=OUT python3 koboldlite.py ...
#
# Every kind is built with ggml's dynamic backend loading (GGML_BACKEND_DL) and all its CPU variants
# (GGML_CPU_ALL_VARIANTS): the CPU backend is one module per instruction-set level (x64, sse42, sandybridge,
# haswell, skylakex, icelake, zen4...), and at start ggml loads the best one the machine runs; a GPU backend is
# one more module, skipped where its driver is missing, so the same build runs on the CPU there. pip's own
# build of llama-cpp-python is compiled for the CPU it was built on (GGML_NATIVE) and is the fastest there,
# but dies with "Illegal instruction" on an older CPU: these builds are what the executables carry.
# noopenmp is the exception, for the tests of the threadpool KoboldLite gives ggml's own threads
# (engine/threadpool.py): like pip's build (this CPU alone, backends linked in) but with -DGGML_OPENMP=OFF.
#
# KOBOLDLITE_CPU_VARIANTS="x64 haswell ..." puts only those CPU variants in OUT (default: all of them). It does not
# shorten the build: ggml's CMake makes every variant a dependency of ggml itself.
set -euo pipefail
backend=${1:?usage: build_llama_lib.sh cpu|vulkan|cuda|noopenmp [OUT] [CUDA_ARCH]}
root=$(cd "$(dirname "$0")/.." && pwd)
case "$backend" in      # prerequisites first: name what is missing before anything is downloaded
  cpu|vulkan|noopenmp) ;;   # tools/vulkan_prereqs.sh installs or names them
  cuda)
    command -v nvcc >/dev/null || { echo "nvcc is missing: install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads, or Debian's nvidia-cuda-toolkit) and put its bin folder on PATH" >&2; exit 2; }
    found=""
    for toolkit in "$(dirname "$(dirname "$(realpath "$(command -v nvcc)")")")" ${CUDA_HOME:+"$CUDA_HOME"} \
                   /usr/local/cuda /usr/local/cuda-* /usr; do
      ls "$toolkit"/include/cublas_v2.h "$toolkit"/targets/*/include/cublas_v2.h >/dev/null 2>&1 && found=$toolkit
    done
    [ -n "$found" ] || { echo "cuBLAS is missing from the CUDA toolkit (llama.cpp's CUDA backend needs it; nvcc alone is not enough): install the toolkit's cuBLAS (the libcublas-dev / cuda-libraries-dev packages, or the full toolkit), or set CUDA_HOME to a toolkit that has it" >&2; exit 2; } ;;
  *) echo "unknown kind $backend: cpu, vulkan, cuda or noopenmp" >&2; exit 2 ;;
esac
command -v cmake >/dev/null && command -v ninja >/dev/null || { echo "cmake and ninja are missing: apt-get install cmake ninja-build (or pip install cmake ninja)" >&2; exit 2; }
out=$(realpath -m "${2:-$root/.llama-$backend/lib}")
pin=$(sed -n 's/^llama-cpp-python==\([^ ;]*\).*/\1/p' "$root/requirements.txt" | head -n 1)    # one pin, on every platform's line
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
base=(-DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
      -DLLAMA_BUILD_TOOLS=$server -DLLAMA_BUILD_SERVER=$server -DLLAMA_BUILD_MTMD=ON -DBUILD_SHARED_LIBS=ON -G Ninja
      -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON)      # the libraries find each other where they are copied
common=("${base[@]}" -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_NATIVE=OFF)
case "$backend" in
  noopenmp)
    cmake -S "$src" -B "$work/build" "${base[@]}" -DGGML_NATIVE=ON -DGGML_OPENMP=OFF >&2 ;;
  cpu)
    cmake -S "$src" -B "$work/build" "${common[@]}" >&2 ;;
  vulkan)
    # shellcheck disable=SC2207
    extra=($(bash "$root/tools/vulkan_prereqs.sh" "$work/vulkan-headers"))
    cmake -S "$src" -B "$work/build" "${common[@]}" -DGGML_VULKAN=ON "${extra[@]}" >&2 ;;
  cuda)
    arch=${3:-native}
    cmake -S "$src" -B "$work/build" "${common[@]}" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" >&2 ;;
esac
# The CPU variants are targets of their own (ggml-cpu-haswell...): all of them unless KOBOLDLITE_CPU_VARIANTS names some.
variants=${KOBOLDLITE_CPU_VARIANTS:-$(sed -n 's/^ *ggml_add_cpu_backend_variant(\([a-z0-9_]*\).*/\1/p' \
  "$src/ggml/src/CMakeLists.txt" | sed -n '/^x64$/,/^sapphirerapids$/p' | tr '\n' ' ')}
[ "$backend" = noopenmp ] && variants=""          # one CPU backend, linked in
targets=(llama mtmd)
for v in $variants; do targets+=("ggml-cpu-$v"); done
case "$backend" in cpu|noopenmp) ;; *) targets+=("ggml-$backend") ;; esac
# BUILD_SERVER=1: llama-server from the same tree too, the peer the benchmarks compare with (into OUT, beside
# the libraries it loads from its own folder).
[ "${BUILD_SERVER:-0}" = 1 ] && targets+=(llama-server)
# Only what this build makes reaches OUT: the libraries are linked again (seconds), so that none left from an
# earlier configuration of the tree (a CPU variant left out this time, a backend linked in before it was a
# module) is copied along.
rm -f "$work"/build/bin/*.so* "$out"/*.so*
cmake --build "$work/build" --target "${targets[@]}" -j "$(nproc)" >&2
cp -a "$work"/build/bin/*.so* "$out"/
if [ -n "${KOBOLDLITE_CPU_VARIANTS:-}" ]; then
  for lib in "$out"/libggml-cpu-*.so; do
    v=$(basename "$lib" .so); v=${v#libggml-cpu-}
    case " $KOBOLDLITE_CPU_VARIANTS " in *" $v "*) ;; *) rm -f "$lib" ;; esac
  done
fi
[ "${BUILD_SERVER:-0}" = 1 ] && cp "$work/build/bin/llama-server" "$out/"
echo "$out"
