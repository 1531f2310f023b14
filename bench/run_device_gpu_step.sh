#!/usr/bin/env bash
# The decode step alone, quickly (a short device window), on the GPU machine from the repository
# root with .carry/ from bench/carry.sh "nanscope nanscope_tests make_synthetic": the DeviceGpu
# and KvCache tests, the GPU test's generate checks with and without the graph, and generate on
# Qwen3-4B shapes (bf16, 32 + 128 tokens) with and without the fused step (and with its products
# on side streams, NANSCOPE_CUDA_STREAMS=1), their per-step times,
# against transformers' GPU generate (sdpa) in the same job. Results: $OUT/step-summary.txt
# (and step.jsonl, step-times.txt, tests.txt, gputest*.txt).
cd "$(dirname "$0")/.."
. bench/device_job.sh
gpu_job
NS=$BIN/nanscope
(timeout 200 $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null 2>&1; cat $W/q4b/*.safetensors > /dev/null) &
SYN=$!
$BIN/nanscope_tests --gtest_filter='DeviceGpu*:KvCache*' > "$OUT/tests.txt" 2>&1; echo "tests exit $?" >> "$OUT/tests.txt"
GEN=$PWD/tests/fixtures/goldens/cuda/generate/generate.json
for g in 1 0; do
  NANSCOPE_CUDA_GRAPH=$g GPU_TEST_ONLY=generate GPU_TEST_GENERATE=$GEN timeout 100 python3 tests/gpu/compare.py \
    $NS tests/fixtures/goldens/cuda tests/fixtures/models /tmp/ns-gpu-$g "$OUT/report-$g.json" > "$OUT/gputest-graph$g.txt" 2>&1
  echo "GPU test graph=$g exit $?" >> "$OUT/tests.txt"
done
wait $SYN
R=$OUT/step.jsonl; : > "$R"
PROMPT=$(python3 -c "print(','.join(str((i * 37 + 11) % 1000 + 1) for i in range(32)))")
# gemv / fuse / streams: the one-row products by warps (NANSCOPE_CUDA_GEMV) or by cuBLAS, the
# fused step, its cuBLAS products on side streams (NANSCOPE_CUDA_STREAMS).
for gfs in ${VARIANTS:-1/1/0 1/1/0 0/1/0 0/1/0 0/1/1 1/0/0 0/0/0}; do
  g=${gfs%%/*} fs=${gfs#*/}; f=${fs%/*} s=${fs#*/}
  NANSCOPE_CUDA_GEMV=$g NANSCOPE_CUDA_FUSE=$f NANSCOPE_CUDA_STREAMS=$s $M nanscope_generate_cuda_gemv${g}_fuse${f}_streams$s \
    $NS generate $W/q4b --ids $PROMPT --max-new-tokens 128 --eos none --attention fused --device cuda \
    --json >> "$R"
done
for gfs in ${TIME_VARIANTS:-1/1/0 0/1/0 1/0/0}; do
  g=${gfs%%/*} fs=${gfs#*/}; f=${fs%/*} s=${fs#*/}
  echo "gemv=$g fuse=$f streams=$s" >> "$OUT/step-times.txt"
  NANSCOPE_CUDA_GEMV=$g NANSCOPE_CUDA_FUSE=$f NANSCOPE_CUDA_STREAMS=$s NANSCOPE_CUDA_STEP_TIMES=1 $NS generate $W/q4b \
    --ids $PROMPT --max-new-tokens 128 --eos none --attention fused --device cuda > /dev/null \
    2>> "$OUT/step-times.txt"
done
[ "${REF:-1}" = 1 ] && $M ref_generate_cuda_sdpa timeout 100 python3 bench/reference/ref_generate.py $W/q4b bf16 32 128 sdpa cuda >> "$R"
python3 - "$R" <<'PY' | tee "$OUT/step-summary.txt"
import json, sys
for l in open(sys.argv[1]):
    if not l.strip().startswith("{"):
        continue
    r = json.loads(l); f = dict(r, **r.get("inner", {}))
    dec = f.get("decode_tokens_per_s") or f.get("tokens_per_s") or 0
    step = f["decode_s"] / 127 * 1e3 if "decode_s" in f else 1e3 / dec if dec else 0
    print(f"{f['label']:<42} rc {f.get('rc')} decode {dec:.1f} tok/s ({step:.2f} ms/step) ids {str(f.get('ids'))[:50]}")
PY
