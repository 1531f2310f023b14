#!/usr/bin/env bash
# Builds the libFuzzer targets (ASan + UBSan) and runs each in turn.
#   fuzz/run.sh [SECONDS] [TARGET...]    SECONDS per target (default 60); TARGETs default to all:
#     safetensors_header model_config adapter_config tokenizer_json hidden_jsonl
# NANSCOPE_FUZZ_RUNS=N runs each target for N executions instead of SECONDS.
# Builds and working corpora go to $NANSCOPE_FUZZ_DIR (default /tmp/nanscope-fuzz), outside the
# repo; corpora are kept between runs (seeded from tests/fixtures and fuzz/seeds each time).
# Crashing inputs are written there as TARGET/crash-* files. Exit status: the first failure.
set -euo pipefail

secs="${1:-60}"
shift || true
all=(safetensors_header model_config adapter_config tokenizer_json hidden_jsonl)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${NANSCOPE_FUZZ_DIR:-/tmp/nanscope-fuzz}"
cxx="${CXX_FUZZ:-clang++}"
# src/common/version.cpp wants the version CMakeLists.txt declares; read it from the same line.
version=$(sed -n 's/^project(nanscope VERSION \([0-9.]*\).*/\1/p' "$root/CMakeLists.txt")
flags=(-std=c++20 "-DNANSCOPE_VERSION=\"$version\"" -O1 -g -march=x86-64-v3 -fsanitize=address,undefined -fno-sanitize-recover=undefined
  -I "$root/src" -I /usr/include/x86_64-linux-gnu/openblas-pthread)
mkdir -p "$out/obj"

tokenizer_srcs=(src/tokenizer/added_tokens.cpp src/tokenizer/bpe.cpp src/tokenizer/json_reader.cpp
  src/tokenizer/regex.cpp src/tokenizer/text.cpp src/tokenizer/unicode_tables.cpp)
sources() {  # the library sources each target links
  case "$1" in
    safetensors_header) echo src/formats/safetensors.cpp src/numerics/dtype.cpp src/common/*.cpp ;;
    model_config) echo src/formats/hf_config.cpp src/numerics/dtype.cpp ;;
    adapter_config) echo src/formats/adapter.cpp src/formats/hub.cpp src/formats/safetensors.cpp \
      src/numerics/dtype.cpp src/common/*.cpp ;;
    tokenizer_json) echo "${tokenizer_srcs[@]}" ;;
    hidden_jsonl) echo src/tools/hidden_inputs.cpp "${tokenizer_srcs[@]}" ;;
    *) echo "unknown fuzz target $1 (known: ${all[*]})" >&2; exit 2 ;;
  esac
}
libs() {
  case "$1" in
    tokenizer_json | hidden_jsonl) echo -lpcre2-8 -l:libutf8proc.a -lfmt ;;
    adapter_config) echo -lpcre2-8 -lfmt ;;
    *) echo -lfmt ;;
  esac
}
newest_header=$(find "$root/src" -name '*.hpp' -printf '%T@\n' | sort -n | tail -1)
stale() {  # stale OUTPUT INPUT...: missing, or older than an input or than any header
  [ -f "$1" ] || return 0
  local t i
  t=$(stat -c %Y "$1")
  [ "${newest_header%.*}" -ge "$t" ] && return 0
  for i in "${@:2}"; do [ "$(stat -c %Y "$i")" -ge "$t" ] && return 0; done
  return 1
}
build() {  # objects shared between targets, compiled once (-fsanitize=fuzzer-no-link)
  local t="$1" objs=() s o
  for s in $(sources "$t"); do
    o="$out/obj/$(echo "$s" | tr / _).o"
    if stale "$o" "$root/$s"; then "$cxx" "${flags[@]}" -fsanitize=fuzzer-no-link -c "$root/$s" -o "$o"; fi
    objs+=("$o")
  done
  if stale "$out/fuzz_$t" "$root/fuzz/fuzz_$t.cpp" "${objs[@]}"; then
    echo "building $out/fuzz_$t"
    # shellcheck disable=SC2046
    "$cxx" "${flags[@]}" -fsanitize=fuzzer "$root/fuzz/fuzz_$t.cpp" "${objs[@]}" $(libs "$t") \
      -o "$out/fuzz_$t"
  fi
}

# Seeds: a few valid files and near misses, copied from the fixtures or written here, so the
# corpora need no binaries in git.
st_seed() {  # st_seed NAME HEADER DATA_BYTES
  local name="$1" header="$2" nbytes="$3" n i
  n=${#header}
  {
    for i in 0 1 2 3 4 5 6 7; do printf "\\x$(printf %02x $(((n >> (8 * i)) & 255)))"; done
    printf '%s' "$header"
    head -c "$nbytes" /dev/zero
  } >"$out/safetensors_header/corpus/seed-$name"
}
seed() {
  local t="$1" c="$out/$1/corpus" f i=0
  mkdir -p "$c"
  case "$t" in
    safetensors_header)
      st_seed empty '{}      ' 0
      st_seed one_f32 '{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}' 24
      st_seed meta '{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[],"data_offsets":[8,10]}}  ' 10
      st_seed sub_byte '{"q":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]},"r":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[3,6]}}' 6
      st_seed empty_tensor '{"e":{"dtype":"I64","shape":[0,5],"data_offsets":[0,0]},"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}' 1
      st_seed unordered '{"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}' 4
      st_seed bad_meta '{"__metadata__":{"k":1}}' 0
      ;;
    model_config)
      for f in "$root"/tests/fixtures/models/*/config.json; do cp "$f" "$c/seed-$((i++))"; done ;;
    adapter_config)
      for f in "$root"/tests/fixtures/adapters/*/adapter_config.json; do cp "$f" "$c/seed-$((i++))"; done ;;
    tokenizer_json | hidden_jsonl)
      for f in "$root"/fuzz/seeds/"$t"/*; do cp "$f" "$c/seed-$(basename "$f")"; done ;;
  esac
}
dict() {
  case "$1" in
    safetensors_header) echo "$root/fuzz/safetensors.dict" ;;
    *) echo "$root/fuzz/json.dict" ;;
  esac
}

status=0
total=0
for t in "${targets[@]}"; do
  build "$t"
  seed "$t"
  cd "$out/$t"
  log="$out/$t/last-run.log"
  if [ -n "${NANSCOPE_FUZZ_RUNS:-}" ]; then limit=(-runs="$NANSCOPE_FUZZ_RUNS"); else limit=(-max_total_time="$secs"); fi
  echo "fuzzing $t: ${limit[*]} (corpus $out/$t/corpus)"
  set +e
  "./../fuzz_$t" "${limit[@]}" -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -dict="$(dict "$t")" "$out/$t/corpus" >"$log" 2>&1
  rc=$?
  set -e
  grep -E '^(==|SUMMARY|    #[0-9]|.*(ERROR|runtime error|Test unit written))' "$log" | head -40 || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  echo "$t: executions ${execs:-unknown} (${rate:-?}/s)  exit status $rc  corpus files $(ls "$out/$t/corpus" | wc -l)"
  total=$((total + ${execs:-0}))
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
  cd "$root"
done
echo "all targets: $total executions"
exit "$status"
