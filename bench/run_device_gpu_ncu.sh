#!/usr/bin/env bash
# Nsight Compute on flash_attention (KREGEX: other kernels; eager and fused) in the pooled
# workload's passes, for two
# builds: .carry/bin/bench_hidden (this tree) and .carry/bin/bench_hidden_old (the one before the
# change under study, if carried). Qwen3-4B's shapes with 4 layers (the kernel sees the same
# passes). BUILDS, ATTN: which; SOURCE=eager|fused: SASS with stall samples; KERNELS=N: N
# launches timed one by one. Also the DeviceGpu flash test of this tree. Results: $OUT/ncu-*.txt, times.txt.
cd "$(dirname "$0")/.."
. bench/device_job.sh; gpu_job
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU" > $OUT/times.txt
$BIN/make_synthetic --out $W/q4 --preset qwen3-4b --layers 4 > /dev/null
python3 -c "
import random; random.seed(1234)
print('\n'.join(str(random.randint(32, 512)) for _ in range(1024)))" > $W/lengths.txt
$BIN/nanscope_tests --gtest_filter='DeviceGpu.Flash*' > $OUT/tests.txt 2>&1; echo "tests exit $?" >> $OUT/tests.txt
tail -3 $OUT/tests.txt
for b in ${BUILDS:-bench_hidden_old bench_hidden}; do
  [ -x $BIN/$b ] || continue
  for a in ${ATTN:-eager fused}; do
    for rep in 1 2; do
      echo "$b $a $(NANSCOPE_CUDA_PROFILE=1 $BIN/$b $W/q4 0 @$W/lengths.txt bf16 $a 8192 cuda last,mean 2>&1 | grep -E 'attention|tokens_per_s' | tr '\n' ' ' | sed 's/cuda profile://g')" >> $OUT/times.txt
    done
    timeout 180 $NCU --clock-control none -k regex:${KREGEX:-flash_attention_k} --launch-skip 8 --launch-count ${KCOUNT:-1} \
      --set full --import-source no $BIN/$b $W/q4 0 @$W/lengths.txt bf16 $a 8192 cuda last,mean \
      > $OUT/ncu-$b-$a.txt 2>&1
  done
done
[ -n "${SOURCE:-}" ] && timeout 120 $NCU --clock-control none -k regex:flash_attention_k --launch-skip 8 \
  --launch-count 1 --set full -o $W/src $BIN/bench_hidden $W/q4 0 @$W/lengths.txt bf16 $SOURCE 8192 cuda last,mean > /dev/null 2>&1 \
  && $NCU --import $W/src.ncu-rep --page source --print-source sass --csv > $W/src-$SOURCE.csv 2>&1 \
  && (cd $W && tar czf $OUT/src.tgz src-$SOURCE.csv)
# Every kernel of about one pass (4 layers) with its duration, for where the rest of the time goes.
[ -n "${KERNELS:-}" ] && timeout 120 $NCU --clock-control none --metrics gpu__time_duration.sum --csv \
  --launch-skip 400 --launch-count ${KERNELS} $BIN/bench_hidden $W/q4 0 @$W/lengths.txt bf16 ${KATTN:-eager} 8192 cuda last,mean \
  > $OUT/kernels-${KATTN:-eager}.csv 2>&1
cat $OUT/times.txt
