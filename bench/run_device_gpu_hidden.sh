#!/usr/bin/env bash
# Issue 15's hidden-state workloads on the GPU machine's H200, nanscope against transformers in
# the same job (from the repository root, with .carry/ from bench/carry.sh; after
# run_device_gpu_generate.sh in the same call, whose checkpoint $W/q4b it reuses if present):
# (1) 64 and 512 prompts x 128 tokens, every state as float32 on the host (ref_hidden.py, sdpa
#     and eager, against bench_hidden eager and fused);
# (2) 1,024 prompts of 32..512 tokens (random, seed 1234), last-token and mean states of every
#     layer: transformers in batches of 32 with padding, unsorted and sorted by length
#     (ref_pooled.py), nanscope packed without padding (bench_hidden ... last,mean), and the
#     command itself (`nanscope hidden --pool last`, shards written);
# (3) the quick test: load + one forward with the hidden states (ref_quicktest.py on cuda,
#     `nanscope trace --device cuda`).
# Results: $OUT/hidden-gpu.jsonl and hidden-summary.txt.
cd "$(dirname "$0")/.."
. bench/device_job.sh
gpu_job
R=$OUT/hidden-gpu.jsonl; : > "$R"
LOG=$OUT/hidden-job.log
[ -f $W/q4b/config.json ] || timeout 240 $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null
cat $W/q4b/*.safetensors > /dev/null
python3 -c "
import random; random.seed(1234)
print('\n'.join(str(random.randint(32, 512)) for _ in range(1024)))" > $W/lengths.txt
B=${BATCH_TOKENS:-8192}
echo "== (1) $(date -u +%T)" >> "$LOG"
for P in 64 512; do
  for a in sdpa eager; do
    $M ref_hidden_${P}_$a timeout 200 python3 bench/reference/ref_hidden.py $W/q4b $P 128 bf16 64 $a cuda >> "$R" 2>> "$LOG"
  done
  for a in eager fused; do
    $M nanscope_hidden_${P}_$a $BIN/bench_hidden $W/q4b $P 128 bf16 $a $B cuda >> "$R" 2>> "$LOG"
  done
done
echo "== (2) $(date -u +%T)" >> "$LOG"
for o in unsorted sorted; do
  $M ref_pooled_$o timeout 200 python3 bench/reference/ref_pooled.py $W/q4b $W/lengths.txt bf16 32 sdpa $o >> "$R" 2>> "$LOG"
done
for a in eager fused; do
  for o in unsorted sorted; do
    $M nanscope_pooled_${a}_$o $BIN/bench_hidden $W/q4b 0 @$W/lengths.txt bf16 $a $B cuda last,mean $o >> "$R" 2>> "$LOG"
  done
done
python3 -c "
import random; random.seed(1234)
L = [int(x) for x in open('$W/lengths.txt').read().split()]
for p, n in enumerate(L): print('{\"id\": %d, \"ids\": %s}' % (p, [random.randrange(151936) for _ in range(n)]))" > $W/pooled.jsonl
for a in eager fused; do
  rm -rf $W/hid-$a
  $M nanscope_hidden_cli_last_$a $BIN/nanscope hidden $W/q4b --input $W/pooled.jsonl --out $W/hid-$a \
    --pool last --attention $a --device cuda --batch-tokens $B --json >> "$R" 2>> "$LOG"
done
echo "== (3) $(date -u +%T)" >> "$LOG"
for rep in 1 2; do
  $M ref_quicktest_cuda_r$rep python3 bench/reference/ref_quicktest.py $W/q4b bf16 sdpa 9707,11,1879,0 cuda >> "$R" 2>> "$LOG"
  $M nanscope_quicktest_cuda_r$rep $BIN/nanscope trace $W/q4b --ids 9707,11,1879,0 --dtype bf16 --device cuda --json >> "$R" 2>> "$LOG"
done
echo "== done $(date -u +%T)" >> "$LOG"
python3 - "$R" <<'PY' | tee "$OUT/hidden-summary.txt"
import json, sys
for l in open(sys.argv[1]):
    if not l.strip().startswith("{"):
        continue
    r = json.loads(l)
    inner = r.get("inner") if isinstance(r.get("inner"), dict) else {}
    tps = inner.get("tokens_per_s")
    print(f"{r['label']:<34} rc {r.get('rc')} wall {r.get('seconds')}s "
          + (f"tokens/s {tps:.0f} " if isinstance(tps, (int, float)) else "")
          + f"inner_seconds {inner.get('seconds')} upload {inner.get('upload_seconds', inner.get('load_seconds'))}")
    f = r
    if f.get("stderr"):
        print("    stderr:", str(f["stderr"])[-300:].replace("\n", " | "))
PY
