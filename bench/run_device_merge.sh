#!/usr/bin/env bash
# Issue #5's merge targets on the GPU machine's CPU in one call: peft's merge script against
# `nanscope merge` (r=16 on every linear layer of a Qwen3-4B-shaped bf16 checkpoint), and the
# merge against `cp -r` of the base, ROUNDS times interleaved. cp -r is timed three ways per
# round: as the first copy after other work, again right after deleting that copy (the page
# cache reuses the pages just freed), and followed by `sync` (the durability the merge gives);
# the merge by default (fsynced, O_DIRECT) and with --no-fsync (page cache, like cp).
cd "$(dirname "$0")/.."
. bench/device_job.sh
R=$OUT/merge.jsonl; : > "$R"
[ -d $W/q4b ] && [ -d $W/lora16 ] || { rm -rf $W/q4b $W/lora16; $BIN/make_synthetic --out $W/q4b --preset qwen3-4b --adapter $W/lora16 --rank 16 > /dev/null; }
cat $W/q4b/*.safetensors > /dev/null  # warm the page cache
[ "${PEFT:-1}" = 1 ] && { $M ref_merge python3 bench/reference/ref_merge.py $W/q4b $W/lora16 $W/merged_peft >> "$R"; rm -rf $W/merged_peft; }
for r in $(seq "${ROUNDS:-3}"); do
  $M cp_r_first_r$r cp -r $W/q4b $W/copy >> "$R"; rm -rf $W/copy
  $M cp_r_again_r$r cp -r $W/q4b $W/copy >> "$R"; rm -rf $W/copy
  $M cp_r_sync_r$r sh -c "cp -r $W/q4b $W/copy && sync" >> "$R"; rm -rf $W/copy
  $M nanscope_merge_r$r $BIN/nanscope merge --base $W/q4b --adapter $W/lora16 --out $W/merged --json >> "$R"; rm -rf $W/merged
  $M nanscope_merge_no_fsync_r$r $BIN/nanscope merge --base $W/q4b --adapter $W/lora16 --out $W/merged --no-fsync --json >> "$R"; rm -rf $W/merged
  # The previous release's binary (nanscope_old, when carried), same round: a regression check.
  [ -x $BIN/nanscope_old ] && { $M nanscope_old_merge_r$r $BIN/nanscope_old merge --base $W/q4b --adapter $W/lora16 --out $W/merged --json >> "$R"; rm -rf $W/merged; }
done
python3 - "$R" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['label']:22s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_gib']:.2f} GiB  rc {r['rc']}")
PY
