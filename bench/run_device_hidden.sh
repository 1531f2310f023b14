#!/usr/bin/env bash
# The hidden-state throughput benchmark of issue #7 on the GPU machine's CPU, in one call:
# transformers (bf16, eager, output_hidden_states=True, one batch of PROMPTS) against
# nanscope's batched forward on the same Qwen3-4B-shaped checkpoint, same job.
# Binaries built on Debian 12 are carried in .carry/bin (libdnnl from .carry/deb).
cd "$(dirname "$0")/.."
. bench/device_job.sh
PROMPTS=${PROMPTS:-64} TOKENS=${TOKENS:-128}
R=$OUT/hidden.jsonl; : > "$R"
{ nproc; lscpu | grep -E 'Model name|^CPU\(s\)|L3|Flags' | sed 's/Flags:.*\(amx_bf16\).*/Flags: ... \1 .../'; free -g | head -2
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'threads', torch.get_num_threads())"
  [ -x $BIN/bench_gemm ] && $BIN/bench_gemm --tokens 4096 --repeat 1 2>&1 | tail -1; } > "$OUT/hidden-machine.txt" 2>&1
cat "$OUT/hidden-machine.txt"
# The bf16 products alone (AMX kernel, oneDNN) and the ceiling of the tile units (products
# alone / with the kernel's loads from L1).
[ -x $BIN/bench_gemm ] && $BIN/bench_gemm --peak 2000000 > "$OUT/amx-peak.json" 2>&1; cat "$OUT/amx-peak.json"
[ "${GEMM:-1}" = 1 ] && $BIN/bench_gemm --tokens 1024,4096 --repeat 2 > "$OUT/gemm.jsonl" 2>&1 && cat "$OUT/gemm.jsonl"
[ -d $W/q4b ] || $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null
cat $W/q4b/*.safetensors > /dev/null  # warm the page cache for both sides
# SWEEP=1: tune the AMX kernel's blocking here first (bench/amx_sweep.sh) and time the best
# setting too ("tuned"). REPS: the reference and nanscope alternate this many times (the machine's
# speed drifts between runs; compare the runs of one repetition, or medians). ALT: environment
# assignments for one more nanscope run per repetition (an A/B of a setting).
TUNED=${TUNED:-}
if [ "${SWEEP:-0}" = 1 ]; then
  bash bench/amx_sweep.sh "$OUT/amx-sweep.jsonl" > "$OUT/amx-sweep.txt"; cat "$OUT/amx-sweep.txt"
  TUNED=$(tail -1 "$OUT/amx-sweep.txt")
fi
for rep in $(seq "${REPS:-1}"); do
  $M ref_hidden_r$rep python3 bench/reference/ref_hidden.py $W/q4b $PROMPTS $TOKENS bf16 $PROMPTS eager >> "$R"
  $M nanscope_hidden_4096_r$rep $BIN/bench_hidden $W/q4b $PROMPTS $TOKENS bf16 eager 4096 >> "$R"
  [ -n "$TUNED" ] && env $TUNED $M nanscope_hidden_4096_tuned_r$rep $BIN/bench_hidden $W/q4b $PROMPTS $TOKENS bf16 eager 4096 >> "$R"
  [ -n "${ALT:-}" ] && env $ALT $M nanscope_hidden_4096_alt_r$rep $BIN/bench_hidden $W/q4b $PROMPTS $TOKENS bf16 eager 4096 >> "$R"
done
[ "${ONEDNN:-1}" = 1 ] && NANSCOPE_NO_AMX=1 $M nanscope_hidden_4096_onednn $BIN/bench_hidden $W/q4b $PROMPTS $TOKENS bf16 eager 4096 >> "$R"
env $TUNED NANSCOPE_PROFILE=1 $BIN/bench_hidden $W/q4b 16 $TOKENS bf16 eager 2048 2>&1 | tail -2
[ -n "${ALT:-}" ] && env $ALT NANSCOPE_PROFILE=1 $BIN/bench_hidden $W/q4b 16 $TOKENS bf16 eager 2048 2>&1 | tail -2
# The command itself, end to end: last-token states of every layer, written to disk.
python3 -c "
import random; random.seed(1234)
for p in range($PROMPTS): print('{\"id\": %d, \"ids\": %s}' % (p, [random.randrange(151936) for _ in range($TOKENS)]))" > $W/prompts.jsonl
rm -rf $W/hid; env $TUNED $M nanscope_hidden_cli_last $BIN/nanscope hidden $W/q4b --input $W/prompts.jsonl --out $W/hid --pool last --json >> "$R"
du -sh $W/hid
cat "$R"
