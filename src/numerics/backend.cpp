// The one place that reads the kernels' environment variables and chooses their paths: see
// backend.hpp.
#include "numerics/backend.hpp"

#include <cpuid.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <string_view>

#include "common/strings.hpp"
#include "numerics/gemm_bf16.hpp"

namespace nanscope {

namespace {

// From this many tokens on, a linear layer is compute-bound: sgemm on widened weights beats
// streaming them through the microkernel.
constexpr int64_t kGemmTokens = 16;
// From this many tokens on, bf16 runs multiply bf16 values (AMX, oneDNN): on a Sapphire Rapids
// Xeon (bench/bench_gemm.cpp) 3-4x the fp32 path already at 128 tokens.
constexpr int64_t kBf16GemmTokens = 32;

// Set and not "0" (nor empty): the convention of every on/off variable here.
bool env_on(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && std::string_view(v) != "0";
}

// For what is on by default: set to 0.
bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string_view(v) == "0";
}

// CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; XCR0 bits 17-18 (tile state) enabled by
// the OS; then Linux >= 5.16 must grant the process the tile data state (arch_prctl).
bool detect_amx() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return false;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
#ifdef __linux__
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return ::syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

Backend& state() {
  static Backend b = backend_from_environment();
  return b;
}

bool bf16_only(MatmulPath p) {
  return p == MatmulPath::OneDnn || is_amx(p);
}

}  // namespace

const char* path_name(MatmulPath p) {
  switch (p) {
    case MatmulPath::Scalar:
      return "scalar";
    case MatmulPath::Stream:
      return "stream";
    case MatmulPath::Stream512:
      return "stream512";
    case MatmulPath::Blas:
      return "blas";
    case MatmulPath::OneDnn:
      return "onednn";
    case MatmulPath::AmxTiles:
      return "amx";
    case MatmulPath::AmxEmulated:
      return "amx-emulated";
  }
  return "?";
}

const char* device_name(Device d) {
  return d == Device::Cuda ? "cuda" : "cpu";
}

std::optional<Device> parse_device(std::string_view s) {
  if (s == "cpu") return Device::Cpu;
  if (s == "cuda") return Device::Cuda;
  return std::nullopt;
}

bool valid(const AmxTuning& t) {
  return t.m > 0 && t.n > 0 && t.k >= 0 && t.m % 32 == 0 && t.n % 32 == 0 && t.k % 32 == 0;
}

Backend backend_from_environment() {
  Backend b;
  if (const char* e = std::getenv("NANSCOPE_THREADS")) {
    try {
      const int v = std::stoi(e);
      if (v > 0) b.threads = v;
    } catch (...) {
    }
  }
  b.profile = env_on("NANSCOPE_PROFILE");
  b.cuda_gemm_f32_out = env_on("NANSCOPE_CUDA_GEMM_F32");
  b.cuda_graph = !env_off("NANSCOPE_CUDA_GRAPH");
  b.cuda_step_times = env_on("NANSCOPE_CUDA_STEP_TIMES");
  b.cuda_profile = env_on("NANSCOPE_CUDA_PROFILE");
  b.cuda_step_streams = env_on("NANSCOPE_CUDA_STREAMS");
  b.cuda_fuse = !env_off("NANSCOPE_CUDA_FUSE");
  b.cuda_join = !env_off("NANSCOPE_CUDA_JOIN");
  b.cuda_gemv = !env_off("NANSCOPE_CUDA_GEMV");
  b.cuda_flash = !env_off("NANSCOPE_CUDA_FLASH");
  if (const char* e = std::getenv("NANSCOPE_GPU_MEMORY"))
    b.cuda_weight_cap = parse_byte_size(e).value_or(0);
  b.amx = env_on("NANSCOPE_NO_AMX")        ? AmxUse::Off
          : env_on("NANSCOPE_AMX_EMULATE") ? AmxUse::Emulated
                                           : AmxUse::Auto;
  b.onednn = !env_on("NANSCOPE_NO_ONEDNN");
  b.avx512 = !env_on("NANSCOPE_NO_AVX512");
  if (const char* e = std::getenv("NANSCOPE_DECODE")) {
    long rows = 0, prefetch = 0, x16 = 0;
    if (std::sscanf(e, "%ld,%ld,%ld", &rows, &prefetch, &x16) >= 2 &&
        (rows == 1 || rows == 2 || rows == 4 || rows == 8) && prefetch >= 0 && prefetch <= 4096)
      b.decode = {rows, prefetch, x16 != 0};
  }
  // oneDNN reads ONEDNN_MAX_CPU_ISA itself; where it is set, it alone caps the ISA.
  b.onednn_amx = std::getenv("ONEDNN_MAX_CPU_ISA") == nullptr;
  AmxTuning& t = b.amx_tuning;
  if (const char* e = std::getenv("NANSCOPE_AMX_BLOCK")) {
    long m = 0, n = 0, k = 0;
    AmxTuning c = t;
    if (std::sscanf(e, "%ld,%ld,%ld", &m, &n, &k) == 3) c.m = m, c.n = n, c.k = k;
    if (valid(c)) t = c;
  }
  if (const char* e = std::getenv("NANSCOPE_AMX_PREFETCH")) {
    const std::string v = e;
    t.prefetch_b = v == "1" || v.find('b') != std::string::npos;  // 1: the default, both
    t.prefetch_a = v == "1" || v.find('a') != std::string::npos;
  }
  if (const char* e = std::getenv("NANSCOPE_AMX_ORDER")) t.n_outer = std::string_view(e) == "nm";
  if (const char* e = std::getenv("NANSCOPE_AMX_STEAL")) t.steal = *e != '0';
  return b;
}

const Backend& backend() {
  return state();
}

void set_backend(const Backend& b) {
  state() = b;
}

ScopedBackend::ScopedBackend(const Backend& b) : saved_(backend()) {
  set_backend(b);
}

ScopedBackend::~ScopedBackend() {
  set_backend(saved_);
}

bool has_amx_hardware() {
  static const bool has = detect_amx();
  return has;
}

bool has_onednn_bf16() {
  return gemm_bf16::available();
}

bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

bool path_runs_here(MatmulPath p, const char** why) {
  const char* reason = nullptr;
  if (p == MatmulPath::Stream512 && !has_avx512()) reason = "no AVX-512 on this processor";
  if (p == MatmulPath::AmxTiles && !has_amx_hardware())
    reason = "no AMX tiles on this processor (or not granted by the kernel)";
  if (p == MatmulPath::OneDnn && !has_onednn_bf16())
    reason = "oneDNN has only its reference bf16 loops on this processor";
  if (why) *why = reason;
  return reason == nullptr;
}

std::optional<MatmulPath> amx_tiles(const Backend& b) {
  if (b.force) {
    if (!is_amx(*b.force)) return std::nullopt;
    if (!path_runs_here(*b.force))
      throw std::logic_error(std::string("backend: forced path ") + path_name(*b.force) +
                             " cannot run on this machine");
    return *b.force;
  }
  switch (b.amx) {
    case AmxUse::Off:
      return std::nullopt;
    case AmxUse::Emulated:
      return MatmulPath::AmxEmulated;
    case AmxUse::Auto:
      break;
  }
  if (has_amx_hardware()) return MatmulPath::AmxTiles;
  return std::nullopt;
}

MatmulPath choose_linear_path(DType dt, int64_t tokens, const Backend& b) {
  if (b.force && (dt == DType::BF16 || !bf16_only(*b.force))) {
    if (!path_runs_here(*b.force))
      throw std::logic_error(std::string("backend: forced path ") + path_name(*b.force) +
                             " cannot run on this machine");
    return *b.force;
  }
  if (dt == DType::BF16 && tokens >= kBf16GemmTokens) {
    if (const auto t = amx_tiles(b)) return *t;
    // oneDNN takes one caller at a time and runs on the OpenMP pool itself: not from inside a
    // parallel loop (products computed side by side, one per worker).
    if (b.onednn && !omp_in_parallel() && has_onednn_bf16()) return MatmulPath::OneDnn;
  }
  if (tokens >= kGemmTokens) return MatmulPath::Blas;
  return b.avx512 && has_avx512() ? MatmulPath::Stream512 : MatmulPath::Stream;
}

MatmulPath choose_attention_path(DType dt, const Backend& b) {
  if (dt == DType::BF16)
    if (const auto t = amx_tiles(b)) return *t;
  return MatmulPath::Blas;
}

}  // namespace nanscope
