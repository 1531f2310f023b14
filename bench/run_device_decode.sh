#!/usr/bin/env bash
# Issue 14's decode step on the GPU machine's CPU, in one call: (1) the kernel paths' tests on
# real AVX-512 and AMX; (2) bench_decode: the step's products alone (7.8 GB of distinct bf16
# weights per step) for each streaming-kernel variant and thread count; (3) generate on Qwen3-4B
# shapes with NANSCOPE_PROFILE=1 (where a step's time goes); (4) generate, 32-token prompt + 128
# new tokens, batch 1, on the AVX-512 kernel and on the AVX2 one (and the variants below),
# against transformers' CPU generate and the decode floor measured in the same job.
cd "$(dirname "$0")/.."
. bench/device_job.sh
R=$OUT/decode.jsonl; : > "$R"
machine_info
if [ "${TESTS:-1}" = 1 ]; then
  $BIN/nanscope_tests --gtest_filter="${FILTER:-Paths/*:Backend*:Kernels*:KvCache*:*GenerateGolden*}" > "$OUT/tests.txt" 2>&1
  grep -E "^\[  (PASSED|FAILED|SKIPPED)|FAILED" "$OUT/tests.txt" | head -20
fi
python3 bench/reference/mem_bandwidth.py >> "$R"
for v in ${DECODE_VARIANTS:-4,1024 4,0 8,1024 4,2048}; do
  LABEL="decode_$v" NANSCOPE_DECODE=$v $BIN/bench_decode --steps 6 >> "$R"
done
if [ "${VARIANTS:-1}" = 1 ]; then
  LABEL=decode_avx2 NANSCOPE_NO_AVX512=1 $BIN/bench_decode --steps 6 >> "$R"
  for th in 8 12; do LABEL="decode_t$th" NANSCOPE_THREADS=$th $BIN/bench_decode --steps 6 >> "$R"; done
fi
# (kept from an earlier job of the same call: bench/run_device_gpu_generate.sh writes the same one)
[ -e $W/q4b/config.json ] || $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null
cat $W/q4b/*.safetensors > /dev/null
P=32; N=${NEW:-128}
PROMPT=$(python3 -c "print(','.join(str((i * 37 + 11) % 1000 + 1) for i in range($P)))")
NANSCOPE_PROFILE=1 $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens 6 --eos none > /dev/null 2> "$OUT/profile.txt"
$M nanscope_generate_avx512 $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --json >> "$R"
NANSCOPE_DECODE=8,1024 $M nanscope_generate_avx512_rows8 $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --json >> "$R"
[ "${VARIANTS:-1}" = 1 ] && NANSCOPE_NO_AVX512=1 $M nanscope_generate_avx2 $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --json >> "$R"
# Where the step's time beyond its products goes (session 7 left ~90 ms unexplained): attention
# and prefill without AMX tiles, OpenMP's threads pinned or always spinning, the mapping instead
# of the resident copy. VARIANTS=0 skips them.
if [ "${VARIANTS:-1}" = 1 ]; then
  NANSCOPE_NO_AMX=1 $M nanscope_generate_no_amx $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --json >> "$R"
  OMP_PROC_BIND=close OMP_PLACES=cores $M nanscope_generate_bound $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --json >> "$R"
  OMP_WAIT_POLICY=active $M nanscope_generate_spin $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --json >> "$R"
  $M nanscope_generate_mapped $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --weights mapped --json >> "$R"
fi
$M ref_generate python3 bench/reference/ref_generate.py $W/q4b bf16 $P $N eager >> "$R"
python3 - "$R" <<'PY' | tee "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
want = ("label", "path", "threads", "best_step_ms", "median_step_ms", "gb_per_s", "seconds",
        "tokens_per_s", "decode_tokens_per_s", "prefill_seconds", "decode_s", "finish_reason")
for r in rows:
    flat = dict(r, **r.get("inner", {}))
    print(json.dumps({k: flat[k] for k in want if k in flat})[:400])
PY
