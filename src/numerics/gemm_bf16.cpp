#include "numerics/gemm_bf16.hpp"

#include <oneapi/dnnl/dnnl.hpp>

#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "numerics/backend.hpp"

namespace nanscope::gemm_bf16 {

namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

struct Runtime {
  bool ok = false;
  std::string impl;
  dnnl::engine engine;
  dnnl::stream stream;
};

// W [N, K] row-major, as the checkpoint stores it, is B^T: B [K, N] in layout "ba".
dnnl::memory::desc user_weights(int64_t K, int64_t N) {
  return dnnl::memory::desc({K, N}, dt::bf16, tag::ba);
}

// Weights in the kernel's own blocked layout (tag::any), reordered per call: on the Xeon this
// made the products 1.1-1.6x faster for 1-2 ms of reordering per matrix (bench/bench_gemm).
dnnl::matmul::primitive_desc describe(const dnnl::engine& e, int64_t M, int64_t K, int64_t N,
                                      dt out = dt::f32, bool bias = false) {
  const dnnl::memory::desc a({M, K}, dt::bf16, tag::ab);
  const dnnl::memory::desc w({K, N}, dt::bf16, tag::any);
  const dnnl::memory::desc c({M, N}, out, tag::ab);
  if (bias) {
    const dnnl::memory::desc b({1, N}, dt::f32, tag::ab);
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, w, b, c), e);
  }
  return dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, w, c), e);
}

Runtime& runtime() {
  static Runtime rt;
  static std::once_flag once;
  std::call_once(once, [] {
    try {
      // oneDNN 2.6 keeps Intel AMX behind an opt-in (the default became "on" in 2.7); AMX is
      // what makes bf16 fast on Sapphire Rapids and later. Must precede the first primitive.
      // ONEDNN_MAX_CPU_ISA in the environment (e.g. AVX512_CORE_BF16) still caps it: then
      // backend().onednn_amx is false (numerics/backend.hpp).
      if (backend().onednn_amx) (void)dnnl::set_max_cpu_isa(dnnl::cpu_isa::avx512_core_amx);
      rt.engine = dnnl::engine(dnnl::engine::kind::cpu, 0);
      rt.stream = dnnl::stream(rt.engine);
      // A shape of the size we use: the implementation chosen for it tells whether oneDNN
      // has a real kernel for bf16 here or only its (very slow) reference loops.
      const auto pd = describe(rt.engine, 256, 1024, 1024);
      rt.impl = pd.impl_info_str();
      rt.ok = rt.impl.find("ref") == std::string::npos;
      if (!rt.ok) rt.impl = "unavailable: oneDNN has only " + rt.impl + " for bf16 here";
    } catch (const dnnl::error& e) {
      rt.ok = false;
      rt.impl = std::string("unavailable: ") + e.what();
    }
  });
  return rt;
}

}  // namespace

bool available() {
  return runtime().ok;
}

std::string implementation() {
  return runtime().impl;
}

namespace {

void run(const uint16_t* a, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,
         void* c, dt out) {
  Runtime& rt = runtime();
  if (!rt.ok) throw std::logic_error("gemm_bf16::matmul called without a oneDNN bf16 kernel");
  // Primitive creation is cached by oneDNN (its primitive cache), so one per call is cheap.
  const auto pd = describe(rt.engine, M, K, N, out, bias != nullptr);
  const dnnl::matmul prim(pd);
  dnnl::memory am(pd.src_desc(), rt.engine, const_cast<uint16_t*>(a));
  dnnl::memory wu(user_weights(K, N), rt.engine, const_cast<uint16_t*>(w));
  dnnl::memory wm = wu;
  if (pd.weights_desc() != wu.get_desc()) {
    wm = dnnl::memory(pd.weights_desc(), rt.engine);
    dnnl::reorder(wu, wm).execute(rt.stream, wu, wm);
  }
  dnnl::memory cm(pd.dst_desc(), rt.engine, c);
  std::unordered_map<int, dnnl::memory> args = {
      {DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, cm}};
  if (bias)
    args.emplace(DNNL_ARG_BIAS, dnnl::memory(pd.bias_desc(), rt.engine, const_cast<float*>(bias)));
  prim.execute(rt.stream, args);
  rt.stream.wait();
}

}  // namespace

void matmul(const uint16_t* a, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* c) {
  run(a, M, K, w, N, nullptr, c, dt::f32);
}

void matmul_bf16_out(const uint16_t* a, int64_t M, int64_t K, const uint16_t* w, int64_t N,
                     const float* bias, uint16_t* c) {
  run(a, M, K, w, N, bias, c, dt::bf16);
}

}  // namespace nanscope::gemm_bf16
