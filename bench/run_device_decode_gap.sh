#!/usr/bin/env bash
# Issue 14: where a CPU decode step's products lose time inside generate (134-203 ms in session
# 8's profile) against bench_decode's 100-105 ms, in one call on the GPU machine's CPU. The same
# products timed four ways -- random weights (bench_decode's own), the checkpoint's resident
# copies as generate reads them, its mapping, and with parallel regions like the step's attention
# and norms between them -- then generate itself with the per-kind profile (NANSCOPE_PROFILE=1).
cd "$(dirname "$0")/.."
. bench/device_job.sh
R=$OUT/gap.jsonl; : > "$R"
machine_info
python3 bench/reference/mem_bandwidth.py >> "$R"
[ -e $W/q4b/config.json ] || $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null
cat $W/q4b/*.safetensors > /dev/null
S=${STEPS:-6}
if [ "${TESTS:-1}" = 1 ]; then
  $BIN/nanscope_tests --gtest_filter="${FILTER:-Backend*:Paths/*:Kernels*}" > "$OUT/tests.txt" 2>&1
  grep -E "^\[  (PASSED|FAILED|SKIPPED)|FAILED" "$OUT/tests.txt" | head -20
fi
# The kernel's tunings (NANSCOPE_DECODE=rows,prefetch[,x16]) on one kind of product alone.
for kind in ${SWEEP_KINDS:-down gate_up}; do
  for v in ${SWEEP:-4,1024 1,1024 1,0 1,4096 2,1024 4,0 4,4096 8,1024 4,1024,1 1,1024,1}; do
    LABEL="${kind}_$v" NANSCOPE_DECODE=$v $BIN/bench_decode --steps 10 --only $kind >> "$R"
  done
done
for v in ${STEP_SWEEP:-}; do
  LABEL="step_$v" NANSCOPE_DECODE=$v $BIN/bench_decode --steps $S >> "$R"
done
LABEL=random $BIN/bench_decode --steps $S >> "$R"
LABEL=random_interleave $BIN/bench_decode --steps $S --interleave >> "$R"
LABEL=model_resident $BIN/bench_decode --steps $S --model $W/q4b >> "$R"
LABEL=model_mapped $BIN/bench_decode --steps $S --model $W/q4b --mapped >> "$R"
LABEL=model_resident_interleave $BIN/bench_decode --steps $S --model $W/q4b --interleave >> "$R"
P=32; N=${NEW:-128}
PROMPT=$(python3 -c "print(','.join(str((i * 37 + 11) % 1000 + 1) for i in range($P)))")
NANSCOPE_PROFILE=1 $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens 16 --eos none > /dev/null 2> "$OUT/profile.txt"
NANSCOPE_PROFILE=1 $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens 16 --eos none --weights mapped > /dev/null 2> "$OUT/profile-mapped.txt"
for extra in ${GENERATE_ENVS:-DEFAULT}; do
  [ "$extra" = DEFAULT ] && e="" || e="$extra"
  env $e $M "nanscope_generate_${extra}" $BIN/nanscope generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --json >> "$R"
done
[ "${REF:-0}" = 1 ] && $M ref_generate python3 bench/reference/ref_generate.py $W/q4b bf16 $P $N eager >> "$R"
python3 - "$R" "$OUT/profile.txt" "$OUT/profile-mapped.txt" <<'PY' | tee "$OUT/summary.txt"
import json, re, sys
for l in open(sys.argv[1]):
    if not l.strip().startswith("{"): continue
    r = json.loads(l); flat = dict(r, **r.get("inner", {}))
    keep = ("label", "weights", "interleave", "only", "best_step_ms", "median_step_ms", "median_step_kinds_ms",
            "gb_per_s", "tokens_per_s", "decode_s", "prefill_s", "seconds")
    print(json.dumps({k: flat[k] for k in keep if k in flat}))
for f in sys.argv[2:]:
    print("--", f.rsplit("/", 1)[-1])
    for l in open(f).read().splitlines()[:40]:
        print(re.sub(r"nanscope profile ", "", l)[:300])
PY
