#!/usr/bin/env bash
# What building llama.cpp's Vulkan backend needs on Debian or Ubuntu, and Mesa's lavapipe (a real Vulkan
# driver running on the CPU) to run it without a GPU. Prints the CMake arguments that point at the headers.
#
# Debian 12's Vulkan headers (1.3.239) are too old for the ggml-vulkan that llama-cpp-python vendors
# (vk::LayerSettingEXT is missing). Where the system's are too old, Debian 13's libvulkan-dev and
# spirv-headers packages are downloaded (never installed: unpacked into a folder of their own) and used for
# the headers alone; the system's loader and glslc are used as they are.
#
#   bash tools/vulkan_prereqs.sh [DIR]     (DIR: where the newer headers go; default .vulkan-headers)
set -euo pipefail
dir=$(realpath -m "${1:-.vulkan-headers}")
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
need=()
command -v glslc >/dev/null || need+=(glslc)
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 \
  || need+=(mesa-vulkan-drivers)
ldconfig -p | grep -q 'libvulkan.so.1 ' || need+=(libvulkan1)
command -v vulkaninfo >/dev/null || need+=(vulkan-tools)
[ -e /usr/lib/x86_64-linux-gnu/libvulkan.so ] || ls /usr/lib/*/libvulkan.so >/dev/null 2>&1 || need+=(libvulkan-dev)
if [ ${#need[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${need[@]}" >&2
fi

header_version() {   # VK_HEADER_VERSION of a vulkan_core.h
  sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\)$/\1/p' "$1" 2>/dev/null
}
include=/usr/include
spirv=""
if [ "$(header_version /usr/include/vulkan/vulkan_core.h || echo 0)" -lt 290 ] 2>/dev/null \
   || ! grep -q LayerSettingEXT /usr/include/vulkan/vulkan_structs.hpp 2>/dev/null; then
  if [ ! -e "$dir/usr/include/vulkan/vulkan_structs.hpp" ]; then
    echo "The system's Vulkan headers are too old for ggml-vulkan: fetching Debian 13's into $dir" >&2
    state=$(mktemp -d)
    mkdir -p "$state/lists/partial" "$dir"
    echo "deb http://deb.debian.org/debian trixie main" > "$state/sources.list"
    opts=(-o Dir::Etc::SourceList="$state/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$state/lists" -o APT::Architecture=amd64 -o APT::Architectures=amd64)
    apt-get "${opts[@]}" update -qq >&2
    (cd "$state" && apt-get "${opts[@]}" download libvulkan-dev spirv-headers >&2)
    for deb in "$state"/*.deb; do dpkg -x "$deb" "$dir"; done
    rm -rf "$state"
  fi
  include="$dir/usr/include"
  spirv="-DSPIRV-Headers_DIR=$dir/usr/share/cmake/SPIRV-Headers"
  [ -d "$dir/usr/share/cmake/SPIRV-Headers" ] || spirv="-DSPIRV-Headers_DIR=$(dirname "$(find "$dir" -name 'SPIRV-HeadersConfig.cmake' | head -1)")"
fi
echo "-DVulkan_INCLUDE_DIR=$include -DCMAKE_CXX_FLAGS=-I$include $spirv"
