#!/usr/bin/env bash
# The hidden-state throughput benchmark of issue #7 on the GPU machine's CPU, in one call:
# transformers (bf16, eager, output_hidden_states=True, one batch of PROMPTS) against
# nanscope's batched forward on the same Qwen3-4B-shaped checkpoint, same job.
# Binaries built on Debian 12 are carried in .carry/bin (libdnnl from .carry/deb).
set -u
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=""
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
W=/tmp/nsbench; mkdir -p "$W"
BIN=.carry/bin
. bench/device_env.sh  # libdnnl and libOpenCL from .carry/deb (bench/carry.sh)
PROMPTS=${PROMPTS:-64} TOKENS=${TOKENS:-128}
R=$OUT/hidden.jsonl; : > "$R"
M="python3 bench/measure.py"
{ nproc; lscpu | grep -E 'Model name|^CPU\(s\)|L3|Flags' | sed 's/Flags:.*\(amx_bf16\).*/Flags: ... \1 .../'; free -g | head -2
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'threads', torch.get_num_threads())"
  [ -x $BIN/bench_gemm ] && $BIN/bench_gemm --tokens 4096 --repeat 1 2>&1 | tail -1; } > "$OUT/hidden-machine.txt" 2>&1
cat "$OUT/hidden-machine.txt"
# The bf16 products alone (AMX kernel, oneDNN), with a few block sizes of the AMX kernel, and
# the ceiling of the tile units (products alone / with the kernel's loads from L1).
[ -x $BIN/bench_gemm ] && $BIN/bench_gemm --peak 2000000 > "$OUT/amx-peak.json" 2>&1; cat "$OUT/amx-peak.json"
[ "${GEMM:-1}" = 1 ] && for blk in ${AMX_BLOCKS:-default}; do
  if [ "$blk" = default ]; then $BIN/bench_gemm --tokens 1024,4096 --repeat 2
  else NANSCOPE_AMX_BLOCK=$blk $BIN/bench_gemm --tokens 4096 --repeat 2 | sed "s/^{/{\"amx_block\":\"$blk\",/"; fi
done > "$OUT/gemm.jsonl" 2>&1
cat "$OUT/gemm.jsonl"
[ -d $W/q4b ] || $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null
cat $W/q4b/*.safetensors > /dev/null  # warm the page cache for both sides
$M ref_hidden python3 bench/reference/ref_hidden.py $W/q4b $PROMPTS $TOKENS bf16 $PROMPTS eager >> "$R"
$M nanscope_hidden_4096 $BIN/bench_hidden $W/q4b $PROMPTS $TOKENS bf16 eager 4096 >> "$R"
[ -n "${HIDDEN_BLOCK:-}" ] && NANSCOPE_AMX_BLOCK=$HIDDEN_BLOCK $M nanscope_hidden_4096_block_$HIDDEN_BLOCK $BIN/bench_hidden $W/q4b $PROMPTS $TOKENS bf16 eager 4096 >> "$R"
[ "${ONEDNN:-1}" = 1 ] && NANSCOPE_NO_AMX=1 $M nanscope_hidden_4096_onednn $BIN/bench_hidden $W/q4b $PROMPTS $TOKENS bf16 eager 4096 >> "$R"
NANSCOPE_PROFILE=1 $BIN/bench_hidden $W/q4b 16 $TOKENS bf16 eager 2048 2>&1 | tail -2
# The command itself, end to end: last-token states of every layer, written to disk.
python3 -c "
import random; random.seed(1234)
for p in range($PROMPTS): print('{\"id\": %d, \"ids\": %s}' % (p, [random.randrange(151936) for _ in range($TOKENS)]))" > $W/prompts.jsonl
rm -rf $W/hid; $M nanscope_hidden_cli_last $BIN/nanscope hidden $W/q4b --input $W/prompts.jsonl --out $W/hid --pool last --json >> "$R"
du -sh $W/hid
cat "$R"
