#!/usr/bin/env bash
# Issue 14 on the GPU machine's CPU, in one call: (1) the generate / unmerged-adapter goldens on
# real AMX tiles; (2) `generate` on Qwen3-4B shapes (bf16, 32-token prompt, 128 new tokens,
# batch 1) against transformers' CPU generate and against the decode floor (the weights read
# once at the memory bandwidth measured in the same job); (3) `compare` against the two traces
# it runs; (4) the greedy goldens of the trained model (tools/fixtures/make_generate_goldens.py).
cd "$(dirname "$0")/.."
. bench/device_job.sh
R=$OUT/generate.jsonl; : > "$R"
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
machine_info
if [ "${TESTS:-1}" = 1 ]; then
  $BIN/nanscope_tests --gtest_filter="${FILTER:-*GenerateGolden*:KvCache*:*PeftGolden*:Generate.*:Compare.*:Divergence*:Trained*:Paths/*:Backend*}" > "$OUT/tests-amx.txt" 2>&1
  grep -E "^\[  (PASSED|FAILED)" "$OUT/tests-amx.txt" | head -20
fi
if [ "${GOLDENS:-1}" = 1 ]; then
  marker=$(mktemp); sleep 1
  CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=8 python3 tools/fixtures/make_generate_goldens.py --fixtures tests/fixtures > "$OUT/gen-goldens.log" 2>&1
  find tests/fixtures -type f -newer "$marker" > /tmp/new_files.txt
  tar czf "$OUT/gen-goldens.tgz" -T /tmp/new_files.txt
fi
$BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null
cat $W/q4b/*.safetensors > /dev/null
du -sb $W/q4b >> "$OUT/machine.txt"
python3 bench/reference/mem_bandwidth.py >> "$R"
P=32; N=${NEW:-128}
PROMPT=$(python3 -c "print(','.join(str((i * 37 + 11) % 1000 + 1) for i in range($P)))")
for rep in $(seq "${REPS:-2}"); do
  $M nanscope_generate_r$rep $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --json >> "$R"
done
$M nanscope_generate_mapped $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --weights mapped --json >> "$R"
$M ref_generate python3 bench/reference/ref_generate.py $W/q4b bf16 $P $N eager >> "$R"
$M nanscope_compare $BIN/nanscope compare $W/q4b $W/q4b --dtype-a bf16 --dtype-b fp32 --ids $PROMPT --json >> "$R"
$M nanscope_trace_bf16 $BIN/nanscope trace $W/q4b --ids $PROMPT --dtype bf16 --json >> "$R"
$M nanscope_trace_fp32 $BIN/nanscope trace $W/q4b --ids $PROMPT --dtype fp32 --json >> "$R"
python3 - "$R" <<'PY' | tee "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
want = ("label", "seconds", "peak_rss_gib", "gb_per_s", "tokens_per_s", "decode_tokens_per_s",
        "prefill_seconds", "prefill_s", "decode_s", "ids", "finish_reason")
for r in rows:
    flat = dict(r, **r.get("inner", {}))
    print(json.dumps({k: flat[k] for k in want if k in flat})[:400])
PY
