# Sourced by the bench/run_device*.sh scripts from the repository root: what every benchmark job
# on the GPU machine sets up. OUT (results, from the environment), W (scratch: checkpoints),
# BIN (the carried binaries), M (bench/measure.py: wall time and peak RSS of one command).
set -u
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=""
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
W=/tmp/nsbench; mkdir -p "$W"
BIN=.carry/bin
M="python3 bench/measure.py"
. bench/device_env.sh  # libdnnl, libOpenCL and libsleef from .carry/deb (bench/carry.sh)
# The tests run the CLI at the path they were built with (build/nanscope): the carried one.
[ -e build/nanscope ] || { mkdir -p build && ln -s "$PWD/$BIN/nanscope" build/nanscope; }
# The machine a CPU job ran on, into $OUT/machine.txt: cores, caches, memory, versions, THP.
machine_info() {
  { nproc; lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|NUMA|L3'; free -g | head -2
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled)"; } > "$OUT/machine.txt" 2>&1
}
# A GPU job: the GPU visible again (hidden above for the CPU benchmarks) and the machine's
# cuBLASLt found for the carried binaries (LT: where, for the job's log).
gpu_job() {
  export CUDA_VISIBLE_DEVICES=0
  LT=$(find /usr/local /opt /usr/lib -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
  export LD_LIBRARY_PATH=$(dirname "${LT:-/x/y}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}
