#!/usr/bin/env bash
# Session 13's GPU job, in one device call (from the repository root, with .carry/ from
# bench/carry.sh "nanscope nanscope_tests make_synthetic bench_hidden"): the DeviceGpu tests, the
# GPU test against transformers' goldens (tests/gpu/compare.py), then the pooled workload of
# run_device_gpu_hidden.sh (1,024 prompts of 32..512 tokens, last + mean of every layer;
# transformers in batches of 32 with padding, unsorted and sorted) against bench_hidden eager and
# fused (and eager with NANSCOPE_CUDA_FLASH=0), 64 x 128 with every state, the pooled command
# itself, and a profile of the eager pooled run. Results: $OUT/hidden-gpu.jsonl, tests.txt,
# gputest.txt, profile-pooled-eager.txt.
cd "$(dirname "$0")/.."
. bench/device_job.sh; gpu_job
(timeout 200 $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null 2>&1; cat $W/q4b/*.safetensors > /dev/null) &
$BIN/nanscope_tests --gtest_filter='DeviceGpu*' > $OUT/tests.txt 2>&1; echo "tests exit $?" >> $OUT/tests.txt
timeout 250 python3 tests/gpu/compare.py $BIN/nanscope tests/fixtures/goldens/cuda tests/fixtures/models /tmp/ns-gpu $OUT/report.json > $OUT/gputest.txt 2>&1; echo "GPU test exit $?" >> $OUT/tests.txt
wait
tail -2 $OUT/tests.txt; grep FAIL $OUT/gputest.txt | head -5; tail -1 $OUT/gputest.txt
python3 -c "
import random; random.seed(1234)
print('\n'.join(str(random.randint(32, 512)) for _ in range(1024)))" > $W/lengths.txt
R=$OUT/hidden-gpu.jsonl; : > $R; LOG=$OUT/hidden-job.log
for o in unsorted sorted; do
  $M ref_pooled_$o timeout 100 python3 bench/reference/ref_pooled.py $W/q4b $W/lengths.txt bf16 32 sdpa $o >> $R 2>> $LOG
done
for a in eager fused; do for o in unsorted sorted; do
  $M nanscope_pooled_${a}_$o timeout 60 $BIN/bench_hidden $W/q4b 0 @$W/lengths.txt bf16 $a 8192 cuda last,mean $o >> $R 2>> $LOG
done; done
$M nanscope_pooled_eager_unsorted_noflash env NANSCOPE_CUDA_FLASH=0 timeout 60 $BIN/bench_hidden $W/q4b 0 @$W/lengths.txt bf16 eager 8192 cuda last,mean >> $R 2>> $LOG
$M ref_hidden_64_sdpa timeout 100 python3 bench/reference/ref_hidden.py $W/q4b 64 128 bf16 64 sdpa cuda >> $R 2>> $LOG
for a in eager fused; do $M nanscope_hidden_64_$a timeout 60 $BIN/bench_hidden $W/q4b 64 128 bf16 $a 8192 cuda >> $R 2>> $LOG; done
python3 -c "
import random; random.seed(1234)
L = [int(x) for x in open('$W/lengths.txt').read().split()]
for p, n in enumerate(L): print('{\"id\": %d, \"ids\": %s}' % (p, [random.randrange(151936) for _ in range(n)]))" > $W/pooled.jsonl
$M nanscope_hidden_cli_last_eager timeout 60 $BIN/nanscope hidden $W/q4b --input $W/pooled.jsonl --out $W/hid-eager --pool last --attention eager --device cuda --batch-tokens 8192 --json >> $R 2>> $LOG
NANSCOPE_CUDA_PROFILE=1 timeout 60 $BIN/bench_hidden $W/q4b 0 @$W/lengths.txt bf16 eager 8192 cuda last,mean > $OUT/profile-pooled-eager.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv > $OUT/machine.txt
python3 - $R <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if not l.strip().startswith("{"): continue
    r = json.loads(l); f = dict(r, **r.get("inner", {}))
    print(f"{f.get('label','?'):<44} rc {f.get('rc')} tok/s {f.get('tokens_per_s', 0):.0f} wall {f.get('wall_s', 0):.2f}")
PY
