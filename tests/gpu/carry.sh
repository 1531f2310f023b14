#!/usr/bin/env bash
# Fills DEST/.carry/cuda (git-ignored; DEST: the checkout that travels to the GPU machine, this one
# by default) for tests/gpu/device_job.sh: the stripped binaries from build/ (built with the CUDA
# toolkit), Debian 12's libdnnl2 / libsleef3 / ocl-icd-libopencl1 that the machine lacks, and the
# scripts the job runs. cuBLAS is the machine's own (its toolkit or torch's wheels).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.}
C=$DEST/.carry/cuda
rm -rf "$C/bin" "$C/bin.tar.xz" "$C/repo"
mkdir -p "$C/bin" "$C/deb" "$C/repo/tools/fixtures" "$C/repo/tests/gpu" "$C/repo/bench/reference"
for b in nanscope bench_hidden make_synthetic; do cp "build/$b" "$C/bin/" && strip "$C/bin/$b"; done
tar -C "$C" -cJf "$C/bin.tar.xz" bin && rm -rf "$C/bin"
(cd "$C/deb" && for p in libdnnl2 ocl-icd-libopencl1 libsleef3; do
  [ -n "$(ls ./${p}_*.deb 2>/dev/null)" ] || apt-get download "$p"; done)
cp tools/fixtures/make_cuda_goldens.py tools/fixtures/make_cuda_generate_goldens.py "$C/repo/tools/fixtures/"
cp tests/gpu/compare.py tests/gpu/run.sh tests/gpu/device_job.sh "$C/repo/tests/gpu/"
cp bench/reference/ref_hidden.py "$C/repo/bench/reference/"
du -sh "$C"
