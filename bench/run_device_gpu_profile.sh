#!/usr/bin/env bash
# Where the GPU hidden-state passes spend their time (NANSCOPE_CUDA_PROFILE=1), on the GPU
# machine from the repository root with .carry/ from bench/carry.sh: bench_hidden on Qwen3-4B
# shapes, 64 x 128 with every state kept and the pooled workload of run_device_gpu_hidden.sh,
# eager and fused; and the DeviceGpu tests. Results: $OUT/profile-*.txt, $OUT/tests.txt.
cd "$(dirname "$0")/.."
. bench/device_job.sh
export CUDA_VISIBLE_DEVICES=0
LT=$(find /usr/local /opt /usr/lib -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH=$(dirname "${LT:-/x/y}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
[ -f $W/q4b/config.json ] || (timeout 240 $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null; cat $W/q4b/*.safetensors > /dev/null) &
SYN=$!
$BIN/nanscope_tests --gtest_filter="${TESTS:-DeviceGpu*}" > "$OUT/tests.txt" 2>&1; echo "tests exit $?" >> "$OUT/tests.txt"
wait $SYN
python3 -c "
import random; random.seed(1234)
print('\n'.join(str(random.randint(32, 512)) for _ in range(1024)))" > $W/lengths.txt
B=${BATCH_TOKENS:-8192}
for a in eager fused; do
  NANSCOPE_CUDA_PROFILE=1 $BIN/bench_hidden $W/q4b 64 128 bf16 $a $B cuda > "$OUT/profile-full-$a.txt" 2>&1
  NANSCOPE_CUDA_PROFILE=1 $BIN/bench_hidden $W/q4b 0 @$W/lengths.txt bf16 $a $B cuda last,mean > "$OUT/profile-pooled-$a.txt" 2>&1
done
