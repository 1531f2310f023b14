#!/usr/bin/env bash
# One call on the GPU machine for the CUDA backend, from the repository root, with what
# tests/gpu/carry.sh put in .carry/cuda: makes the goldens with transformers on the GPU
# (tools/fixtures/make_cuda_goldens.py), runs the GPU test against them (tests/gpu/compare.py),
# a memory check of two passes when compute-sanitizer is there, and the hidden-state throughput
# of a Qwen3-4B-shaped checkpoint, nanscope against transformers, in the same job.
# Everything lands in $OUT (goldens.tar.gz, gputest*.txt, report.json, bench.jsonl, job.log).
# GOLDENS=DIR: compare with those goldens instead of making new ones; BENCH=0: no benchmark;
# GEMM_F32=0: no second test with fp32-output products; SANITIZE=0: no memcheck.
set -u
C=.carry/cuda
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cuda-out}; mkdir -p "$OUT"
LOG=$OUT/job.log
mkdir -p $C/bin && tar -C $C -xJf $C/bin.tar.xz
for f in $C/deb/*.deb; do dpkg -x "$f" /tmp/carried-libs; done
LT=$(find /usr/local /opt /usr/lib -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH=/tmp/carried-libs/usr/lib/x86_64-linux-gnu:$(dirname "${LT:-/x/y}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
NS=$C/bin/nanscope
M=tests/fixtures/models
{ date -u; nvidia-smi; echo "cublasLt: $LT"; ldd $NS | grep -E "not found|cublas"
  cuobjdump --list-elf $NS 2>&1 | head -3; cuobjdump --list-ptx $NS 2>&1 | head -3; } > "$LOG" 2>&1
# The benchmark's checkpoint is written meanwhile (CPU and disk only).
if [ "${BENCH:-1}" = 1 ]; then
  (timeout 200 $C/bin/make_synthetic --out /tmp/q4b --preset qwen3-4b > /dev/null 2> "$OUT/synth.err"
   cat /tmp/q4b/*.safetensors > /dev/null) &
  SYNTH=$!
fi
G=${GOLDENS:-}
if [ -z "$G" ]; then
  G=/tmp/goldens
  echo "== goldens $(date -u +%T)" >> "$LOG"
  timeout 200 python3 $C/repo/tools/fixtures/make_cuda_goldens.py --models $M --out $G >> "$LOG" 2>&1
  echo "goldens exit $?" >> "$LOG"
  tar -C /tmp -czf "$OUT/goldens.tar.gz" goldens
fi
echo "== trace qwen3-fp16-attn $(date -u +%T)" >> "$LOG"
for a in eager fused; do
  timeout 30 $NS trace $M/qwen3-fp16-attn --ids 1,15,300,7,42,999,3,12 --dtype fp16 --attention $a \
    --device cuda --json > "$OUT/fp16-attn-$a.json" 2>> "$LOG"; echo "exit $?" >> "$LOG"
done
if command -v compute-sanitizer > /dev/null && [ "${SANITIZE:-1}" = 1 ]; then
  (for a in eager fused; do
     timeout 60 compute-sanitizer --tool memcheck --print-limit 5 $NS trace $M/mistral-tiny \
       --ids 7,60,113,166,219,272,325,378,431,484 --dtype bf16 --attention $a --device cuda \
       > /dev/null 2> "$OUT/memcheck-$a.txt"; echo "memcheck $a exit $?" >> "$OUT/memcheck-$a.txt"
   done) &
  SAN=$!
fi
echo "== GPU test $(date -u +%T)" >> "$LOG"
timeout 200 python3 $C/repo/tests/gpu/compare.py $NS $G $M /tmp/ns-gpu /tmp/ns-gpu/report.json \
  > "$OUT/gputest.txt" 2>&1; echo "GPU test exit $?" >> "$LOG"
cp /tmp/ns-gpu/report.json "$OUT/" 2>/dev/null
if [ "${GEMM_F32:-1}" = 1 ]; then  # the same with products written in fp32 (an A/B of the output type)
  echo "== GPU test, NANSCOPE_CUDA_GEMM_F32=1 $(date -u +%T)" >> "$LOG"
  NANSCOPE_CUDA_GEMM_F32=1 GPU_TEST_FILTER=short timeout 100 python3 $C/repo/tests/gpu/compare.py \
    $NS $G $M /tmp/ns-gpu-f32 > "$OUT/gputest-gemm-f32.txt" 2>&1; echo "exit $?" >> "$LOG"
fi
[ -n "${SAN:-}" ] && { wait $SAN; cat "$OUT"/memcheck-*.txt >> "$LOG"; rm -f "$OUT"/memcheck-*.txt; }
if [ "${BENCH:-1}" = 1 ]; then
  wait $SYNTH
  echo "== bench $(date -u +%T)" >> "$LOG"
  R=$OUT/bench.jsonl; : > "$R"
  for a in sdpa eager; do
    timeout 100 python3 $C/repo/bench/reference/ref_hidden.py /tmp/q4b 64 128 bf16 64 $a cuda >> "$R" 2>> "$LOG"
  done
  for a in eager fused; do
    for bt in 8192 4096; do
      timeout 60 $C/bin/bench_hidden /tmp/q4b 64 128 bf16 $a $bt cuda >> "$R" 2>> "$LOG"
    done
  done
  cat "$R" >> "$LOG"
fi
echo "== done $(date -u +%T)" >> "$LOG"
tail -45 "$OUT/gputest.txt"
tail -25 "$LOG"
