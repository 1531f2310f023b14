#!/usr/bin/env bash
# A short GPU job for a change that must keep the bits (about 4 minutes, from the repository root,
# with .carry/ from bench/carry.sh "nanscope nanscope_tests make_synthetic bench_hidden"): the
# pooled checksums of a 4-layer Qwen3-4B-shaped checkpoint with NANSCOPE_CUDA_FUSE=1 and 0 and NANSCOPE_CUDA_JOIN=0 (the
# figures to compare with the last full job's), the DeviceGpu flash and pass tests, then the
# pooled workload of run_device_gpu_pooled.sh against transformers (sorted first, then unsorted)
# and a profile of the fused run. Results: $OUT/checksums.txt, tests.txt, hidden-gpu.jsonl,
# profile-pooled-fused.txt.
cd "$(dirname "$0")/.."
. bench/device_job.sh; gpu_job
python3 -c "
import random; random.seed(1234)
print('\n'.join(str(random.randint(32, 512)) for _ in range(1024)))" > $W/lengths.txt
(timeout 150 $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null 2>&1; cat $W/q4b/*.safetensors > /dev/null) &
$BIN/make_synthetic --out $W/q4 --preset qwen3-4b --layers 4 > /dev/null
for a in eager fused; do for f in 1 0; do
  echo "$a fuse=$f $(NANSCOPE_CUDA_FUSE=$f $BIN/bench_hidden $W/q4 0 @$W/lengths.txt bf16 $a 8192 cuda last,mean | grep -o '"checksum":[0-9.e-]*')"
done; done > $OUT/checksums.txt
echo "fused fuse=1 join=0 $(NANSCOPE_CUDA_JOIN=0 $BIN/bench_hidden $W/q4 0 @$W/lengths.txt bf16 fused 8192 cuda last,mean | grep -o '"checksum":[0-9.e-]*')" >> $OUT/checksums.txt
cat $OUT/checksums.txt
$BIN/nanscope_tests --gtest_filter='DeviceGpu.Flash*:DeviceGpu.PassLayer*' > $OUT/tests.txt 2>&1; echo "tests exit $?" >> $OUT/tests.txt
tail -2 $OUT/tests.txt
wait
R=$OUT/hidden-gpu.jsonl; : > $R; LOG=$OUT/hidden-job.log
for o in sorted unsorted; do
  $M ref_pooled_$o timeout 100 python3 bench/reference/ref_pooled.py $W/q4b $W/lengths.txt bf16 32 sdpa $o >> $R 2>> $LOG
  for a in fused eager; do
    $M nanscope_pooled_${a}_$o timeout 60 $BIN/bench_hidden $W/q4b 0 @$W/lengths.txt bf16 $a 8192 cuda last,mean $o >> $R 2>> $LOG
  done
  $M nanscope_pooled_fused_join0_$o env NANSCOPE_CUDA_JOIN=0 timeout 60 $BIN/bench_hidden $W/q4b 0 @$W/lengths.txt bf16 fused 8192 cuda last,mean $o >> $R 2>> $LOG
done
NANSCOPE_CUDA_PROFILE=1 timeout 60 $BIN/bench_hidden $W/q4b 0 @$W/lengths.txt bf16 fused 8192 cuda last,mean > $OUT/profile-pooled-fused.txt 2>&1
python3 - $R <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if not l.strip().startswith("{"): continue
    r = json.loads(l); f = dict(r, **r.get("inner", {}))
    print(f"{f.get('label','?'):<44} rc {f.get('rc')} tok/s {f.get('tokens_per_s', 0):.0f}")
PY
