#!/usr/bin/env bash
# --gpu-memory and the decode step's side streams on the GPU machine (from the repository root,
# with .carry/ from bench/carry.sh "nanscope nanscope_tests make_synthetic bench_hidden"):
# (1) the DeviceGpu tests (streamed weights bit for bit as resident ones, fused step with and
#     without NANSCOPE_CUDA_STREAMS) and the GPU test's generate checks;
# (2) Qwen3-4B shapes, bf16 (8.0 GB of weights): generate 32 + 128 tokens fused, with the step's
#     products on one stream and on three (NANSCOPE_CUDA_STREAMS=1), and under --gpu-memory 4GiB;
# (3) hidden states of 64 x 128 tokens (every state kept as float32) without a cap and under
#     4GiB / 2GiB, nanscope (bench_hidden) against transformers with accelerate's offload
#     (device_map="auto", max_memory) in the same job; the pooled command over 1,024 prompts of
#     32..512 tokens without a cap and under 4GiB / 2GiB, its shards compared byte for byte;
#     the peak GPU memory of each run from nvidia-smi.
# Results: $OUT/stream-summary.txt (and stream.jsonl, tests.txt, step-times.txt, gpu-mem.txt).
cd "$(dirname "$0")/.."
. bench/device_job.sh
gpu_job
NS=$BIN/nanscope
(timeout 200 $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null 2>&1; cat $W/q4b/*.safetensors > /dev/null) &
SYN=$!
S0=$(date +%s)
timeout 240 $BIN/nanscope_tests --gtest_filter='DeviceGpu*' > "$OUT/tests.txt" 2>&1; echo "tests exit $? in $(( $(date +%s) - S0 )) s" >> "$OUT/tests.txt"
GEN=$PWD/tests/fixtures/goldens/cuda/generate/generate.json
GPU_TEST_ONLY=generate GPU_TEST_GENERATE=$GEN timeout 100 python3 tests/gpu/compare.py \
  $NS tests/fixtures/goldens/cuda tests/fixtures/models /tmp/ns-gpu "$OUT/report.json" > "$OUT/gputest.txt" 2>&1
echo "GPU test generate exit $?" >> "$OUT/tests.txt"
wait $SYN
R=$OUT/stream.jsonl; : > "$R"
# peak LABEL CMD...: runs CMD under bench/measure.py while nvidia-smi samples the GPU's memory.
peak() {
  local label=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > $W/mem.txt 2>/dev/null &
  local P=$!
  $M "$label" "$@" >> "$R"
  kill $P 2>/dev/null; wait $P 2>/dev/null
  echo "$label peak_gpu_mib $(sort -n $W/mem.txt | tail -1)" >> "$OUT/gpu-mem.txt"
}
PROMPT=$(python3 -c "print(','.join(str((i * 37 + 11) % 1000 + 1) for i in range(32)))")
G="generate $W/q4b --ids $PROMPT --max-new-tokens 128 --eos none --attention fused --device cuda --json"
for s in 0 1 0 1; do NANSCOPE_CUDA_STREAMS=$s peak nanscope_generate_streams$s $NS $G; done
peak nanscope_generate_cap4g $NS $G --gpu-memory 4GiB
for s in 0 1; do
  echo "streams=$s" >> "$OUT/step-times.txt"
  NANSCOPE_CUDA_STREAMS=$s NANSCOPE_CUDA_STEP_TIMES=1 $NS $G > /dev/null 2>> "$OUT/step-times.txt"
done
for cap in none 4GiB 2GiB; do
  if [ $cap = none ]; then
    peak ref_hidden_64_sdpa_$cap timeout 200 python3 bench/reference/ref_hidden.py $W/q4b 64 128 bf16 64 sdpa cuda
    peak nanscope_hidden_64_fused_$cap $BIN/bench_hidden $W/q4b 64 128 bf16 fused 8192 cuda
  else
    peak ref_hidden_64_sdpa_$cap timeout 200 python3 bench/reference/ref_hidden.py $W/q4b 64 128 bf16 64 sdpa cuda $cap
    NANSCOPE_GPU_MEMORY=$cap peak nanscope_hidden_64_fused_$cap $BIN/bench_hidden $W/q4b 64 128 bf16 fused 8192 cuda
  fi
done
python3 -c "
import random; random.seed(1234)
L = [random.randint(32, 512) for _ in range(1024)]
for p, n in enumerate(L): print('{\"id\": %d, \"ids\": %s}' % (p, [random.randrange(151936) for _ in range(n)]))" > $W/pooled.jsonl
for cap in none 4GiB 2GiB; do
  rm -rf $W/hid-$cap
  F=""; [ $cap = none ] || F="--gpu-memory $cap"
  peak nanscope_hidden_cli_mean_$cap $NS hidden $W/q4b --input $W/pooled.jsonl --out $W/hid-$cap \
    --pool mean --attention fused --device cuda --batch-tokens 8192 --json $F
  (cd $W/hid-$cap && sha256sum $(ls | grep -v index.json | sort)) > $W/sha-$cap.txt
done
for cap in 4GiB 2GiB; do
  if cmp -s $W/sha-none.txt $W/sha-$cap.txt; then echo "shards under $cap: identical to no cap ($(wc -l < $W/sha-none.txt) files)"; else echo "shards under $cap: DIFFER"; diff $W/sha-none.txt $W/sha-$cap.txt | head; fi
done >> "$OUT/tests.txt"
python3 - "$R" "$OUT/gpu-mem.txt" <<'PY' | tee "$OUT/stream-summary.txt"
import json, sys
mem = dict(l.split(" peak_gpu_mib ") for l in open(sys.argv[2]).read().splitlines() if " peak_gpu_mib " in l)
for l in open(sys.argv[1]):
    if not l.strip().startswith("{"):
        continue
    r = json.loads(l); f = dict(r, **(r.get("inner") if isinstance(r.get("inner"), dict) else {}))
    dec = f.get("decode_tokens_per_s")
    tps = f.get("tokens_per_s")
    ids = f.get("ids")
    print(f"{r['label']:<34} rc {r.get('rc')} wall {r.get('seconds')}s"
          + (f" decode {dec:.1f} tok/s" if isinstance(dec, (int, float)) else "")
          + (f" tokens/s {tps:.0f}" if isinstance(tps, (int, float)) else "")
          + f" peak GPU {mem.get(r['label'], '?').strip()} MiB"
          + (f" ids {str(ids)[:40]} hash {hash(str(ids)) & 0xffff}" if ids else ""))
    if r.get("rc"):
        print("    stderr:", str(r.get("stderr"))[-400:].replace("\n", " | "))
PY
cat "$OUT/tests.txt"
