#!/usr/bin/env bash
# Issue 15, generate on --device cuda, in one call on the GPU machine (from the repository root,
# with .carry/ from bench/carry.sh "nanscope nanscope_tests make_synthetic"):
# (1) the greedy goldens of transformers on the GPU (tools/fixtures/make_cuda_generate_goldens.py);
# (2) the GPU test (tests/gpu/compare.py): trace and hidden against the committed goldens of
#     tests/fixtures/goldens/cuda, generate against the goldens of (1); a memcheck of two decodes;
# (3) generate on Qwen3-4B shapes (bf16, 32-token prompt, 128 new tokens, batch 1), nanscope
#     against transformers' GPU generate in the same job, and the HBM copy rate (the decode floor).
# (2) and (3) run twice for generate: as it is (the decode step replayed as one CUDA graph), and
# with NANSCOPE_CUDA_GRAPH=0 (launched one by one; gputest-graph.txt); the benchmark also without
# the decode step's fused kernels (NANSCOPE_CUDA_FUSE=0).
# Everything lands in $OUT/all.tgz (machine.txt, gen-goldens.tgz, gputest*.txt, report*.json,
# bench.jsonl, step-times.txt, summary.txt, job.log, ...: at most 8 files come back), with
# summary.txt, gputest.txt, bench.jsonl and job.log beside it. GOLDENS_ONLY=1: (1) alone;
# GOLDENS=committed: no (1), the goldens of tests/fixtures/goldens/cuda/generate; BENCH=0: no (3);
# REF_EAGER=0: transformers' generate with sdpa only; NSYS=1: an nsys kernel summary of a decode
# (nsys-*.txt) where the machine has nsys.
cd "$(dirname "$0")/.."
. bench/device_job.sh
gpu_job
LOG=$OUT/job.log
NS=$BIN/nanscope
{ date -u; nvidia-smi; nproc; free -g | head -2; echo "cublasLt: $LT"; ldd $NS | grep -E "not found|cublas"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} > "$OUT/machine.txt" 2>&1
if [ "${BENCH:-1}" = 1 ]; then  # the benchmark's checkpoint, written meanwhile (CPU and disk)
  (timeout 240 $BIN/make_synthetic --out $W/q4b --preset qwen3-4b > /dev/null 2> "$OUT/synth.err"
   cat $W/q4b/*.safetensors > /dev/null) &
  SYNTH=$!
fi
GEN=/tmp/gen-goldens/generate.json
if [ "${GOLDENS:-make}" = committed ]; then
  GEN=$PWD/tests/fixtures/goldens/cuda/generate/generate.json
else
  echo "== generate goldens $(date -u +%T)" >> "$LOG"
  timeout 240 python3 tools/fixtures/make_cuda_generate_goldens.py --models tests/fixtures/models \
    --out /tmp/gen-goldens > "$OUT/gen-goldens.log" 2>&1
  echo "goldens exit $?" >> "$LOG"
  tar -C /tmp -czf "$OUT/gen-goldens.tgz" gen-goldens
fi
if [ "${GOLDENS_ONLY:-0}" = 1 ]; then cat "$OUT/gen-goldens.log" | tail -5; exit 0; fi
if command -v compute-sanitizer > /dev/null; then
  (for g in 0 1; do for a in eager fused; do
     NANSCOPE_CUDA_GRAPH=$g timeout 90 compute-sanitizer --tool memcheck --print-limit 5 $NS generate \
       tests/fixtures/models/mistral-tiny --ids 7,60,113,166,219,272,325,378 --max-new-tokens 12 \
       --eos none --dtype bf16 --attention $a --device cuda > /dev/null 2> /tmp/memcheck-$g-$a.txt
     echo "memcheck graph=$g $a exit $?" >> /tmp/memcheck-$g-$a.txt
   done; done) &
  SAN=$!
fi
$BIN/nanscope_tests --gtest_filter='Device*:KvCache*' > "$OUT/tests.txt" 2>&1; echo "tests exit $?" >> "$LOG"
echo "== GPU test $(date -u +%T)" >> "$LOG"
GPU_TEST_GENERATE=$GEN timeout 300 python3 tests/gpu/compare.py $NS \
  tests/fixtures/goldens/cuda tests/fixtures/models /tmp/ns-gpu "$OUT/report.json" > "$OUT/gputest.txt" 2>&1
echo "GPU test exit $?" >> "$LOG"
NANSCOPE_CUDA_GRAPH=0 GPU_TEST_ONLY=generate GPU_TEST_GENERATE=$GEN \
  timeout 200 python3 tests/gpu/compare.py $NS tests/fixtures/goldens/cuda tests/fixtures/models \
  /tmp/ns-gpu-graph "$OUT/report-graph.json" > "$OUT/gputest-graph.txt" 2>&1
echo "GPU test (graph) exit $?" >> "$LOG"
[ -n "${SAN:-}" ] && { wait $SAN; cat /tmp/memcheck-*.txt >> "$LOG"; }
if [ "${BENCH:-1}" = 1 ]; then
  wait $SYNTH
  echo "== bench $(date -u +%T)" >> "$LOG"
  R=$OUT/bench.jsonl; : > "$R"
  du -sb $W/q4b >> "$OUT/machine.txt"
  # The decode floor: the HBM rate of a large device-to-device copy (bytes read + written).
  python3 - >> "$R" 2>> "$LOG" <<'PY'
import json, torch
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
ts = []
for _ in range(10):
    s.record(); y.copy_(x); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
ts.sort()
print(json.dumps({"label": "hbm_copy", "bytes": 2 * x.numel(), "seconds_median": ts[5],
                  "tb_per_s": 2 * x.numel() / ts[5] / 1e12}))
PY
  P=32; N=128
  PROMPT=$(python3 -c "print(','.join(str((i * 37 + 11) % 1000 + 1) for i in range(32)))")
  for g in 0 1; do
    for a in fused eager; do
      for rep in 1 2; do
        NANSCOPE_CUDA_GRAPH=$g $M nanscope_generate_cuda_${a}_graph${g}_r$rep $NS generate $W/q4b \
          --ids $PROMPT --max-new-tokens $N --eos none --attention $a --device cuda --json >> "$R"
      done
    done
    # The decode step without its fused kernels (NANSCOPE_CUDA_FUSE=0): what the fusion gains.
    for rep in 1 2; do
      NANSCOPE_CUDA_GRAPH=$g NANSCOPE_CUDA_FUSE=0 $M nanscope_generate_cuda_fused_graph${g}_nofuse_r$rep \
        $NS generate $W/q4b --ids $PROMPT --max-new-tokens $N --eos none --attention fused \
        --device cuda --json >> "$R"
    done
    for f in 1 0; do
      echo "graph=$g fuse=$f" >> "$OUT/step-times.txt"
      NANSCOPE_CUDA_GRAPH=$g NANSCOPE_CUDA_FUSE=$f NANSCOPE_CUDA_STEP_TIMES=1 $NS generate $W/q4b \
        --ids $PROMPT --max-new-tokens 16 --eos none --attention fused --device cuda > /dev/null \
        2>> "$OUT/step-times.txt"
    done
  done
  if [ "${NSYS:-0}" = 1 ] && command -v nsys > /dev/null; then
    for g in 0 1; do
      NANSCOPE_CUDA_GRAPH=$g timeout 120 nsys profile --cuda-graph-trace=node -o /tmp/nsys-$g -f true \
        $NS generate $W/q4b --ids $PROMPT --max-new-tokens 64 --eos none --device cuda > /dev/null 2>&1
      timeout 120 nsys stats -r cuda_gpu_kern_sum -f csv /tmp/nsys-$g.nsys-rep > "$OUT/nsys-$g.txt" 2>&1
    done
  fi
  for a in sdpa $([ "${REF_EAGER:-1}" = 1 ] && echo eager); do
    $M ref_generate_cuda_$a timeout 150 python3 bench/reference/ref_generate.py $W/q4b bf16 $P $N $a cuda >> "$R" 2>> "$LOG"
  done
  # check --device cuda end to end (fp32 reference + bf16 + fp16; target under 3 s), and the
  # CPU against the GPU on one input (compare --device-a cpu --device-b cuda).
  for rep in 1 2; do
    $M nanscope_check_cuda_r$rep $NS check $W/q4b --ids $PROMPT --device cuda --json >> "$R" 2>> "$LOG"
  done
  $M nanscope_compare_cpu_cuda $NS compare $W/q4b $W/q4b --ids $PROMPT --dtype bf16 \
    --device-a cpu --device-b cuda --json >> "$R" 2>> "$LOG"
  python3 - "$R" <<'PY' | tee "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
ref = {r["inner"]["attn"]: r["inner"]["ids"] for r in rows if r["label"].startswith("ref_") and "inner" in r}
for r in rows:
    f = dict(r, **r.get("inner", {}))
    if f["label"].startswith("nanscope") and "ids" in f:  # the first 16 ids against transformers'
        want = ref.get("sdpa" if "_fused_" in f["label"] else "eager")
        f["label"] += "" if want is None else (" =ref16" if f["ids"][:16] == want else " !=ref16")
        r["label"] = f["label"]
for r in rows:
    f = dict(r, **r.get("inner", {}))
    if f.get("label") == "hbm_copy":
        print(f"hbm copy {f['tb_per_s']:.2f} TB/s"); continue
    dec = f.get("decode_tokens_per_s") or f.get("tokens_per_s") or 0
    step = f["decode_s"] / 127 * 1e3 if "decode_s" in f else 1e3 / dec if dec else 0
    print(f"{f['label']:<34} rc {f.get('rc')} wall {f.get('seconds')}s decode {dec:.1f} tok/s "
          f"({step:.2f} ms/step) prefill {f.get('prefill_s', f.get('prefill_seconds'))} "
          f"ids {str(f.get('ids'))[:60]}")
    if f.get("stderr"):
        print("    stderr:", f["stderr"][-300:].replace("\n", " | "))
PY
fi
echo "== done $(date -u +%T)" >> "$LOG"
tail -30 "$OUT/gputest.txt"
tail -8 "$OUT/gputest-graph.txt"
cat "$LOG"
tail -5 "$OUT/step-times.txt"
(cd "$OUT" && tar czf /tmp/all.tgz ./* && mv /tmp/all.tgz . &&
  find . -maxdepth 1 -type f ! -name all.tgz ! -name summary.txt ! -name gputest.txt \
    ! -name bench.jsonl ! -name job.log -delete)
