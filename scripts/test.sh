#!/usr/bin/env bash
# Runs every test: the C++ unit and command-line tests (ctest), the Python binding tests, the
# bad-input tests again under ASan + UBSan, and a short run of every fuzz target (docs/fuzzing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
(cd build && ctest --output-on-failure -j"$(nproc)")
if [ -f python/CMakeLists.txt ]; then
  PYTHONPATH=build/python /usr/bin/python3 -m pytest -q python/tests
fi
if [ "${NANSCOPE_SKIP_SANITIZERS:-0}" != 1 ]; then
  BUILD_DIR=build-asan scripts/build.sh -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNANSCOPE_SANITIZE=ON \
    -DNANSCOPE_BENCH=OFF -DNANSCOPE_PYTHON=OFF -DNANSCOPE_CUDA=OFF
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    build-asan/nanscope_tests --gtest_filter='Safetensors*:Checkpoint*:Adapter*:BadInput*:Cli*:Hub*:TempFiles*:MappedFiles*:FuzzFindings*'
fi
if [ -x fuzz/run.sh ] && [ "${NANSCOPE_SKIP_FUZZ:-0}" != 1 ]; then
  fuzz/run.sh "${NANSCOPE_FUZZ_SECONDS:-7}"  # seconds per target: five targets, about 35 s
fi
