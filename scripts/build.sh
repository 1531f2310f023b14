#!/usr/bin/env bash
# Configures and builds nanscope into build/ (Release, warnings as errors).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNANSCOPE_WERROR=ON "$@" >/dev/null
ninja -C "$BUILD_DIR" -j"$(nproc)"
