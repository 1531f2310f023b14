#!/usr/bin/env bash
# Sweeps the AMX kernel's blocking, prefetch and loop order on this machine (bench_gemm, the
# decoder's three product shapes at 4096 rows), PASSES times interleaved against noise, and
# prints the settings of the best one as environment assignments on the last line.
# Score: the time of one decoder layer's products, q_proj's shape standing for q/k/v/o
# (weight 2.5), gate_proj's for gate/up (2), down_proj's (1); best of the passes per setting.
# A setting: BLOCK/PREFETCH/ORDER[/STEAL] (NANSCOPE_AMX_* of docs/interface.md).
# Usage: bench/amx_sweep.sh OUT.jsonl   (BIN=.carry/bin by default; CONFIGS to override)
set -u
OUT=$1; BIN=${BIN:-.carry/bin}; PASSES=${PASSES:-2}
CONFIGS=${CONFIGS:-"128,128,512/b/mn 128,128,256/b/mn 128,128,256/ab/mn 128,128,256/ab/nm
128,128,512/ab/mn 128,128,512/ab/nm 256,128,256/b/mn 128,256,256/ab/nm 256,256,256/b/mn
128,128,10240/ab/mn 256,64,512/ab/mn 128,128,128/ab/mn 64,256,256/ab/nm"}
: > "$OUT"
for pass in $(seq "$PASSES"); do
  for c in $CONFIGS; do
    IFS=/ read -r blk pf ord steal <<< "$c"
    NANSCOPE_AMX_BLOCK=$blk NANSCOPE_AMX_PREFETCH=$pf NANSCOPE_AMX_ORDER=$ord NANSCOPE_AMX_STEAL=${steal:-1} \
      $BIN/bench_gemm --tokens 4096 --repeat 3 --amx-only 1 2>/dev/null |
      grep '"shape"' | sed "s|^{|{\"config\":\"$c\",\"pass\":$pass,|" >> "$OUT"
  done
done
python3 - "$OUT" <<'PY'
import json, sys, collections
weight = {"q_proj": 2.5, "gate_proj": 2.0, "down_proj": 1.0}
best = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r = json.loads(line)
    t = 2.0 * r["M"] * r["N"] * r["K"] / (r["amx_gflops"] * 1e9)
    d = best[r["config"]]
    d[r["shape"]] = min(d.get(r["shape"], 1e9), t)
score = {c: sum(weight[s] * t for s, t in d.items()) for c, d in best.items() if len(d) == 3}
for c in sorted(score, key=score.get):
    g = {s: round(2.0 * 4096 * {"q_proj": 4096 * 2560, "gate_proj": 9728 * 2560, "down_proj": 2560 * 9728}[s] / t / 1e9) for s, t in best[c].items()}
    print(f"# {c:24s} layer products {score[c] * 1e3:7.2f} ms  GFLOP/s {g}")
blk, pf, order, *steal = min(score, key=score.get).split("/")
print(f"NANSCOPE_AMX_BLOCK={blk} NANSCOPE_AMX_PREFETCH={pf} NANSCOPE_AMX_ORDER={order} NANSCOPE_AMX_STEAL={(steal or ['1'])[0]}")
PY
