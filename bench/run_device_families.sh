#!/usr/bin/env bash
# Second-wave checks on the GPU machine's CPU, in one call: (1) the golden tests on real AMX
# tiles with the engine of issue #13; (2) no regression on Qwen3-4B shapes (hidden and trace
# against transformers, same job); (3) the mixture of experts on a Qwen3-30B-A3B-shaped
# synthetic checkpoint (its real widths, 128 experts, top 8; LAYERS layers): what a trace
# reads against the routed experts' bytes, peak RSS, and hidden throughput against transformers.
cd "$(dirname "$0")/.."
. bench/device_job.sh
R=$OUT/families.jsonl; : > "$R"
# The test binary finds its fixtures by the path it was built with.
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
{ nproc; lscpu | grep -E 'Model name|^CPU\(s\)'; free -g | head -2
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'threads', torch.get_num_threads())"; } > "$OUT/machine.txt" 2>&1
if [ "${TESTS:-1}" = 1 ]; then
  $BIN/nanscope_tests --gtest_filter="${FILTER:-Goldens/*:Arch*:Forward*:Trace*:Check*:Elementwise*:Kernels*:Paths/*:Backend*:Reference*}" > "$OUT/tests-amx.txt" 2>&1
  grep -E "^\[  (PASSED|FAILED)|tests ran" "$OUT/tests-amx.txt" | head -20
fi
IDS=9707,11,1879,0
if [ "${DENSE:-1}" = 1 ]; then
  $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null
  cat $W/q4b/*.safetensors > /dev/null
  $M ref_quicktest_bf16 python3 bench/reference/ref_quicktest.py $W/q4b bf16 eager $IDS >> "$R"
  $M nanscope_trace_bf16 $BIN/nanscope trace $W/q4b --ids $IDS --dtype bf16 --json >> "$R"
  $M nanscope_check $BIN/nanscope check $W/q4b --ids $IDS --json >> "$R"
  # Alternating with the previous release's binary (bench_hidden_old, when carried): the
  # machine's speed drifts between runs, the A/B of one repetition does not.
  for rep in $(seq "${REPS:-1}"); do
    $M ref_hidden_r$rep python3 bench/reference/ref_hidden.py $W/q4b 64 128 bf16 64 eager >> "$R"
    $M nanscope_hidden_r$rep $BIN/bench_hidden $W/q4b 64 128 bf16 eager 4096 >> "$R"
    [ -x $BIN/bench_hidden_old ] && $M nanscope_hidden_old_r$rep $BIN/bench_hidden_old $W/q4b 64 128 bf16 eager 4096 >> "$R"
  done
  rm -rf $W/q4b
fi
if [ "${MOE:-1}" = 1 ]; then
  $BIN/make_synthetic --out $W/moe --preset qwen3-30b-a3b --layers "${LAYERS:-4}" >> "$R"
  du -sb $W/moe >> "$OUT/machine.txt"
  cat $W/moe/*.safetensors > /dev/null
  $M cat_moe sh -c "cat $W/moe/*.safetensors > /dev/null" >> "$R"
  $M nanscope_trace_moe $BIN/nanscope trace $W/moe --ids $IDS --dtype bf16 --json >> "$R"
  $M nanscope_trace_moe2 $BIN/nanscope trace $W/moe --ids $IDS --dtype bf16 --json >> "$R"
  $BIN/nanscope trace $W/moe --ids $IDS --dtype bf16 --json | python3 -c "import json, sys; print(json.dumps({'label': 'moe_trace_weight_bytes', 'bytes': json.load(sys.stdin)['weight_bytes']}))" >> "$R"
  $M ref_quicktest_moe python3 bench/reference/ref_quicktest.py $W/moe bf16 eager $IDS >> "$R"
  $M ref_hidden_moe python3 bench/reference/ref_hidden.py $W/moe 16 128 bf16 16 eager >> "$R"
  $M nanscope_hidden_moe $BIN/bench_hidden $W/moe 16 128 bf16 eager 2048 >> "$R"
fi
cat "$R" | cut -c1-600
