#!/usr/bin/env bash
# Prepares .carry/ (git-ignored) for a run on the GPU machine, which has Ubuntu 24.04 with
# OpenBLAS, PCRE2 and fmt 9 but neither oneDNN nor utf8proc (linked statically):
#   .carry/bin.tar.xz  stripped nanscope binaries from build/ (unpacked into .carry/bin by
#                bench/device_env.sh: compressed, they leave room under the transfer limit)
#   .carry/deb/  Debian 12's libdnnl2, ocl-icd-libopencl1 and libsleef3 packages (about 8 MB); a
#                run unpacks them with bench/device_env.sh
# The working tree plus .carry travels to the device, 64 MiB at most: keep the binaries few.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .carry/bin .carry/bin.tar.xz
mkdir -p .carry/bin .carry/deb
for b in "${@:-nanscope bench_hidden make_synthetic}"; do
  for x in $b; do cp "build/$x" .carry/bin/ && strip ".carry/bin/$x"; done
done
tar -C .carry -cJf .carry/bin.tar.xz bin && rm -rf .carry/bin
(cd .carry/deb && for p in libdnnl2 ocl-icd-libopencl1 libsleef3; do
  [ -n "$(ls ./${p}_*.deb 2>/dev/null)" ] || apt-get download "$p"; done)
du -sh .carry
