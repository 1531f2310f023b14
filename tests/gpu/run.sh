#!/usr/bin/env bash
# The GPU test of the CUDA backend (tests/gpu/compare.py says what it checks), for the GPU
# machine: build with the CUDA toolkit elsewhere and carry the binary (docs/cuda.md).
#   tests/gpu/run.sh [NANSCOPE=build/nanscope] [GOLDENS=tests/fixtures/goldens/cuda] [WORK=/tmp/ns-gpu]
# Needs a visible NVIDIA GPU: without one (CI, the development machines) it says so and exits 77
# (ctest's "skipped"), and it is never registered with ctest: CI runs the host-side tests only.
set -euo pipefail
cd "$(dirname "$0")/../.."
NS=${1:-build/nanscope}
GOLDENS=${2:-tests/fixtures/goldens/cuda}
WORK=${3:-/tmp/ns-gpu}
if ! nvidia-smi -L 2>/dev/null | grep -q GPU; then
  echo "tests/gpu/run.sh: no NVIDIA GPU visible here; this test runs on the GPU machine only" >&2
  exit 77
fi
nvidia-smi -L
python3 tests/gpu/compare.py "$NS" "$GOLDENS" tests/fixtures/models "$WORK" "$WORK/report.json"
# The decode steps launched one by one instead of replayed as a graph: the same tokens.
NANSCOPE_CUDA_GRAPH=0 GPU_TEST_ONLY=generate python3 tests/gpu/compare.py "$NS" "$GOLDENS" \
  tests/fixtures/models "$WORK-nograph" "$WORK/report-nograph.json"
