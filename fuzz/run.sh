#!/usr/bin/env bash
# Builds the safetensors header fuzz target with libFuzzer + ASan + UBSan and runs it.
#   fuzz/run.sh [seconds]        (default 60)
# Build and working corpus go to $NANSCOPE_FUZZ_DIR (default /tmp/nanscope-fuzz), outside the repo;
# the corpus is kept between runs. Crashing inputs are written there as crash-* files.
set -euo pipefail

secs="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${NANSCOPE_FUZZ_DIR:-/tmp/nanscope-fuzz}"
cxx="${CXX_FUZZ:-clang++}"
mkdir -p "$out/corpus"

echo "building $out/fuzz_safetensors_header"
"$cxx" -std=c++20 -O1 -g -march=x86-64-v3 -fsanitize=fuzzer,address,undefined \
  -fno-sanitize-recover=undefined -I "$root/src" \
  "$root/fuzz/fuzz_safetensors_header.cpp" "$root/src/formats/safetensors.cpp" \
  "$root/src/numerics/dtype.cpp" "$root/src/common/atomic_file.cpp" -lfmt \
  -o "$out/fuzz_safetensors_header"

# Seeds: a few valid files (and near misses) written here, so the corpus needs no binaries in git.
seed() {  # seed NAME HEADER DATA_BYTES
  local name="$1" header="$2" nbytes="$3" n i
  n=${#header}
  {
    for i in 0 1 2 3 4 5 6 7; do printf "\\x$(printf %02x $(((n >> (8 * i)) & 255)))"; done
    printf '%s' "$header"
    head -c "$nbytes" /dev/zero
  } >"$out/corpus/seed-$name"
}
seed empty '{}      ' 0
seed one_f32 '{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}' 24
seed meta '{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[],"data_offsets":[8,10]}}  ' 10
seed sub_byte '{"q":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]},"r":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[3,6]}}' 6
seed empty_tensor '{"e":{"dtype":"I64","shape":[0,5],"data_offsets":[0,0]},"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}' 1
seed unordered '{"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}' 4
seed bad_meta '{"__metadata__":{"k":1}}' 0

echo "fuzzing for ${secs}s (corpus $out/corpus)"
cd "$out"
log="$out/last-run.log"
set +e
./fuzz_safetensors_header -max_total_time="$secs" -max_len=4096 -print_final_stats=1 \
  -dict="$root/fuzz/safetensors.dict" "$out/corpus" 2>&1 | tee "$log" | grep -E '^(#[0-9]+[[:space:]]+(pulse|DONE)|==|SUMMARY|Done)' || true
rc=${PIPESTATUS[0]}
set -e
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
echo "executions: ${execs:-unknown}   exit status: $rc   corpus files: $(ls "$out/corpus" | wc -l)"
exit "$rc"
