#!/usr/bin/env bash
# Where the GPU hidden-state passes spend their time (NANSCOPE_CUDA_PROFILE=1), on the GPU
# machine from the repository root with .carry/ from bench/carry.sh: bench_hidden on Qwen3-4B
# shapes, 64 x 128 with every state kept and the pooled workload of run_device_gpu_hidden.sh,
# eager and fused; generate's decode steps (launched one by one); the DeviceGpu tests; and the
# products alone against torch (bench_cuda_gemm, ref_cuda_gemm.py). Results: $OUT/profile-*.txt,
# $OUT/gemm.jsonl, $OUT/tests.txt.
cd "$(dirname "$0")/.."
. bench/device_job.sh
gpu_job
[ -f $W/q4b/config.json ] || (timeout 240 $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null; cat $W/q4b/*.safetensors > /dev/null) &
SYN=$!
$BIN/nanscope_tests --gtest_filter="${TESTS:-DeviceGpu*}" > "$OUT/tests.txt" 2>&1; echo "tests exit $?" >> "$OUT/tests.txt"
wait $SYN
python3 -c "
import random; random.seed(1234)
print('\n'.join(str(random.randint(32, 512)) for _ in range(1024)))" > $W/lengths.txt
B=${BATCH_TOKENS:-8192}
PROMPT=$(python3 -c "print(','.join(str((i * 37 + 11) % 1000 + 1) for i in range(32)))")
NANSCOPE_CUDA_GRAPH=0 NANSCOPE_CUDA_PROFILE=1 $BIN/nanscope generate $W/q4b --ids $PROMPT \
  --max-new-tokens 128 --eos none --attention fused --device cuda --json > "$OUT/profile-generate.txt" 2>&1
for a in eager fused; do
  NANSCOPE_CUDA_PROFILE=1 $BIN/bench_hidden $W/q4b 64 128 bf16 $a $B cuda > "$OUT/profile-full-$a.txt" 2>&1
  NANSCOPE_CUDA_PROFILE=1 $BIN/bench_hidden $W/q4b 0 @$W/lengths.txt bf16 $a $B cuda last,mean > "$OUT/profile-pooled-$a.txt" 2>&1
done
# The products alone: cuBLAS as forward_cuda.cpp calls it (and with a workspace, and cuBLASLt's
# heuristic) against torch's F.linear on the same inputs, 8,192 rows and 1 (a decode step);
# equal hashes mean equal output bits.
if [ -x $BIN/bench_cuda_gemm ]; then
  for n in 8192 1; do $BIN/bench_cuda_gemm $n; python3 bench/reference/ref_cuda_gemm.py $n; done > "$OUT/gemm.jsonl" 2>&1
fi
