#!/usr/bin/env bash
# One call on the GPU machine (from the repository root, .carry/ from bench/carry.sh "nanscope
# nanscope_tests"): peft's goldens of adapters applied unmerged on cuda
# (tools/fixtures/make_cuda_peft_goldens.py, into tests/fixtures/goldens/cuda/peft; GOLDENS=keep
# uses the committed ones; BASE_GOLDENS=m1,m2: make_cuda_goldens.py for those models too), then
# the GPU test against every golden (tests/gpu/compare.py) and
# the DeviceGpu tests. $OUT: peft-goldens.tgz, peft-goldens.log, gputest.txt, unit.txt, tests.txt.
cd "$(dirname "$0")/../.."
. bench/device_job.sh
gpu_job
G=tests/fixtures/goldens/cuda/peft
if [ "${GOLDENS:-make}" = make ]; then
  rm -rf $G
  timeout 300 python3 tools/fixtures/make_cuda_peft_goldens.py --out $G > "$OUT/peft-goldens.log" 2>&1
  echo "goldens exit $?" >> "$OUT/tests.txt"
  tar czf "$OUT/peft-goldens.tgz" -C tests/fixtures/goldens/cuda peft
fi
if [ -n "${BASE_GOLDENS:-}" ]; then  # base models' goldens beside the adapters' (their sdpa)
  timeout 200 python3 tools/fixtures/make_cuda_goldens.py --only "$BASE_GOLDENS" --out $W/base-goldens \
    > "$OUT/base-goldens.log" 2>&1
  echo "base goldens exit $?" >> "$OUT/tests.txt"
  mv $W/base-goldens/VERSIONS.json $W/base-goldens/VERSIONS-$(echo $BASE_GOLDENS | tr , -).json
  cp $W/base-goldens/* tests/fixtures/goldens/cuda/
  tar czf "$OUT/base-goldens.tgz" -C $W/base-goldens .
fi
timeout 300 python3 tests/gpu/compare.py $BIN/nanscope tests/fixtures/goldens/cuda tests/fixtures/models \
  /tmp/ns-gpu "$OUT/report.json" > "$OUT/gputest.txt" 2>&1
echo "GPU test exit $?" >> "$OUT/tests.txt"
timeout 200 $BIN/nanscope_tests --gtest_filter='DeviceGpu*' > "$OUT/unit.txt" 2>&1
echo "DeviceGpu exit $?" >> "$OUT/tests.txt"
cat "$OUT/tests.txt"; tail -5 "$OUT/peft-goldens.log" 2>/dev/null; grep -E "FAILED|Failure" -A3 "$OUT/unit.txt" | head -20
tail -25 "$OUT/gputest.txt"
