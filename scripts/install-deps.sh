#!/usr/bin/env bash
# Installs everything nanscope needs to build, test and benchmark on Debian 12 (run as root, or
# with sudo available). Nothing is assumed present, not even a compiler.
set -euo pipefail
packages=(
  g++ cmake ninja-build pkg-config git ca-certificates  # toolchain
  nlohmann-json3-dev      # config.json / safetensors headers / tokenizer.json
  libcli11-dev            # command line: one declaration per flag drives parsing and --help
  libfmt-dev              # formatting of human output and messages
  libpcre2-dev            # tokenizer pre-split regex: Unicode properties + JIT
  libutf8proc-dev         # NFC normalisation for the tokenizer
  libopenblas-dev         # fp32 matrix products (sgemm) for merge and the fp32 forward
  libdnnl-dev             # oneDNN: bf16 matrix products (Intel AMX / AVX512-BF16) for batched runs
  libsleef-dev            # SLEEF: the vector expf of torch's CPU kernels (SiLU), same bits
  libgtest-dev libgmock-dev  # unit tests
  libbenchmark-dev        # micro-benchmarks in bench/
  python3 python3-dev pybind11-dev python3-numpy python3-pytest  # Python bindings and their tests
  python3-setuptools python3-wheel python3-pip python3-venv  # pip install . / pip wheel . (offline)
  clang libclang-rt-14-dev  # libFuzzer + ASan/UBSan for the safetensors header fuzz target
  chromium                # renders the check --report page in a test
)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}"
