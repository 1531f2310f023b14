#!/usr/bin/env bash
# The side-by-side benchmark, run on the GPU machine's CPU (16 cores) in one call: nanscope
# (binaries built on a Debian 12 machine and carried in .carry/) against the reference tools
# (safetensors + torch, transformers, peft, tokenizers) on a Qwen3-4B-shaped checkpoint.
# Every figure of BENCHMARKS.md comes from the results.jsonl this writes.
cd "$(dirname "$0")/.."
. bench/device_job.sh
rm -rf "$W"; mkdir -p "$W"
if ldd $BIN/nanscope | grep -q "not found"; then export LD_LIBRARY_PATH=$PWD/.carry/lib; fi
R=$OUT/results.jsonl; : > "$R"
log() { echo "== $*" >&2; }
{ nproc; lscpu | grep -E 'Model name|^CPU\(s\)|L3'; free -g | head -2; python3 -c "import torch, transformers, peft, tokenizers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'tokenizers', tokenizers.__version__, 'threads', torch.get_num_threads())"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

log synthetic checkpoint
$M make_synthetic $BIN/make_synthetic --out $W/q4b --preset qwen3-4b --adapter $W/lora16 --rank 16 >> "$R"
cp tests/fixtures/tokenizer/qwen3/tokenizer.json tests/fixtures/tokenizer/qwen3/tokenizer_config.json $W/q4b/
du -sh $W/q4b $W/lora16 >&2
cat $W/q4b/*.safetensors > /dev/null  # warm the page cache
IDS=9707,11,1879,0

log scan
$M cat sh -c "cat $W/q4b/*.safetensors > /dev/null" >> "$R"
$M cat2 sh -c "cat $W/q4b/*.safetensors > /dev/null" >> "$R"
$M ref_scan python3 bench/reference/ref_scan.py $W/q4b >> "$R"
$M nanscope_scan $BIN/nanscope scan $W/q4b --json >> "$R"
$M nanscope_scan2 $BIN/nanscope scan $W/q4b --json >> "$R"

log trace
$M ref_quicktest_bf16 python3 bench/reference/ref_quicktest.py $W/q4b bf16 eager $IDS >> "$R"
$M nanscope_trace_bf16 $BIN/nanscope trace $W/q4b --ids $IDS --dtype bf16 --json >> "$R"
$M nanscope_trace_bf16_2 $BIN/nanscope trace $W/q4b --ids $IDS --dtype bf16 --json >> "$R"
$M ref_quicktest_fp32 python3 bench/reference/ref_quicktest.py $W/q4b fp32 eager $IDS >> "$R"
$M nanscope_trace_fp32 $BIN/nanscope trace $W/q4b --ids $IDS --dtype fp32 --json >> "$R"
$M nanscope_check $BIN/nanscope check $W/q4b --ids $IDS --json >> "$R"

log merge
$M ref_merge python3 bench/reference/ref_merge.py $W/q4b $W/lora16 $W/merged_peft >> "$R"
rm -rf $W/merged_peft
$M cp_r cp -r $W/q4b $W/q4b_copy >> "$R"; rm -rf $W/q4b_copy
$M nanscope_merge $BIN/nanscope merge --base $W/q4b --adapter $W/lora16 --out $W/merged_ns --json >> "$R"
rm -rf $W/merged_ns

log tokenizer
if [ -x $BIN/bench_tokenizer ]; then
  $M nanscope_tokenizer $BIN/bench_tokenizer tests/fixtures/tokenizer/qwen3/tokenizer.json tests/fixtures/tokenizer/corpus.jsonl >> "$R"
fi
if [ -f tools/fixtures/make_tokenizer_goldens.py ]; then
  $M ref_tokenizer python3 tools/fixtures/make_tokenizer_goldens.py --tokenizer tests/fixtures/tokenizer/qwen3/tokenizer.json --corpus tests/fixtures/tokenizer/corpus.jsonl --out $W/tokgold >> "$R"
fi

log hidden
if [ -f bench/reference/ref_hidden.py ] && [ -x $BIN/bench_hidden ]; then
  $M ref_hidden python3 bench/reference/ref_hidden.py $W/q4b 8 128 >> "$R"
  $M nanscope_hidden $BIN/bench_hidden $W/q4b 8 128 bf16 >> "$R"
fi
rm -rf "$W"
cat "$R"
