// The CUDA forward pass's kernels (kernels.hpp). Simple, one thread per element or one warp per
// row: this first GPU step is about transformers' numerics on the GPU; the matrix products, where
// the time goes, are cuBLAS's. Built with nvcc's default contraction (a*b+c may become one FMA),
// as torch's own CUDA kernels are: their fp32 steps are what these mirror.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda/kernels.hpp"

namespace nanscope::cuda {
namespace {

constexpr float kInf = __builtin_huge_valf();

// The stream of every launch: the legacy default stream, or the one a decode step's CUDA graph
// is captured on (set_stream).
cudaStream_t g_stream = nullptr;

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA kernel ") + what + ": " + cudaGetErrorString(e));
}

// The GPU's multiprocessors (grid sizes of the strided kernels).
unsigned sm_count() {
  static const unsigned n = [] {
    int d = 0, c = 0;
    if (cudaGetDevice(&d) != cudaSuccess ||
        cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, d) != cudaSuccess || c <= 0)
      return 132u;
    return unsigned(c);
  }();
  return n;
}

unsigned blocks_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > (1ll << 30) ? (1ll << 30) : b));
}

__device__ __forceinline__ float round_dt(float x, Dt dt) {
  if (dt == Dt::BF16) return __bfloat162float(__float2bfloat16_rn(x));
  if (dt == Dt::F16) return __half2float(__float2half_rn(x));
  return x;
}

// Two fp32 values rounded to the run dtype, packed as an mma operand (the first in the low half).
template <bool BF16>
__device__ __forceinline__ uint32_t pack_round(float lo, float hi) {
  if constexpr (BF16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

__device__ __forceinline__ float load_dt(const void* p, Dt dt, int64_t i) {
  if (dt == Dt::BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dt == Dt::F16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_dt(void* p, Dt dt, int64_t i, float x) {
  if (dt == Dt::BF16)
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
  else if (dt == Dt::F16)
    static_cast<__half*>(p)[i] = __float2half_rn(x);
  else
    static_cast<float*>(p)[i] = x;
}

__device__ __forceinline__ void note_nonfinite(SiteStats* st) {
  if (st != nullptr) atomicOr(&st->nonfinite, 1u);
}

// Grid-stride loops: every element, whatever the grid.
#define FOR_EACH(i, n)                                                      \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += int64_t(gridDim.x) * blockDim.x)

__global__ void to_storage_k(const float* x, void* out, int64_t n, Dt dt) {
  FOR_EACH(i, n) store_dt(out, dt, i, x[i]);
}

__global__ void convert_k(const void* src, Dt sdt, void* dst, Dt ddt, int64_t n) {
  FOR_EACH(i, n) store_dt(dst, ddt, i, load_dt(src, sdt, i));
}

__global__ void bias_round_k(const void* c, Dt ctype, const float* bias, int64_t rows, int64_t cols,
                             Dt dt, float* out) {
  FOR_EACH(i, rows * cols) {
    float x = load_dt(c, ctype, i);
    if (bias != nullptr) x = x + bias[i % cols];
    out[i] = round_dt(x, dt);
  }
}

// A grid row per segment. Searching each element's segment in a loop over the launch's
// parameters put them in local memory and cost 4 ms per layer on Qwen3-4B's gate/up at 8,192
// tokens (the products themselves: 1.1 ms).
__global__ void bias_round_many_k(RoundSegments segs, int64_t rows, Dt dt) {
  const RoundSegment s = segs.seg[blockIdx.y];
  const int64_t n = rows * s.cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float x = load_dt(s.c_in, s.ctype, i);
    if (s.bias != nullptr) x = x + s.bias[i % s.cols];
    s.out[i] = round_dt(x, dt);
  }
}

// 1 / rms of a row of n as every RMSNorm here computes it: fp32 sum of squares (each thread's
// strided partial, warp butterflies, then the warps' partials: a tree, as torch's reductions; the
// order is not torch's exactly), rsqrtf as torch.rsqrt on CUDA. The block size is part of the
// order: rmsnorm_k and the fused decode kernels launch n <= 128 ? 32 : 256 threads per row so
// that they agree bit for bit.
__device__ __forceinline__ float rms_inv_of(float sum_sq, int64_t n, float eps) {
  return rsqrtf(sum_sq / float(n) + eps);
}

__device__ float row_rms_inv(const float* xr, int64_t n, float eps) {
  __shared__ float part[32];
  float s = 0.0f;
  // torch squares (pow) in one kernel and sums in another: no FMA of the square into the sum.
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s = __fadd_rn(s, __fmul_rn(xr[j], xr[j]));
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o /= 2) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (threadIdx.x == 0) part[0] = t;
  }
  __syncthreads();
  return rms_inv_of(part[0], n, eps);
}

// row_rms_inv for a row held by one warp: with blockDim 32 the second stage above adds zeros to
// the one warp's sum, so this is the same number (pass_qkv's warp per row).
__device__ float warp_rms_inv(const float* xr, int64_t n, float eps) {
  const int lane = int(threadIdx.x % 32);
  float s = 0.0f;
  for (int64_t j = lane; j < n; j += 32) s = __fadd_rn(s, __fmul_rn(xr[j], xr[j]));
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  return rms_inv_of(s, n, eps);
}

__device__ __forceinline__ float norm_value(float x, float r, float w, bool offset, Dt dt) {
  return offset ? round_dt(x * r * (1.0f + w), dt) : round_dt(w * round_dt(x * r, dt), dt);
}

// out = round(w * round(x * r)), or Gemma's round(x * r * (1 + w)); and in storage at st[st_at +
// j] (each nullable). out may be x (each thread writes what it read).
__device__ void row_norm_out(const float* xr, int64_t n, const float* w, float r, bool offset,
                             Dt dt, float* orow, void* st, int64_t st_at) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float o = norm_value(xr[j], r, w[j], offset, dt);
    if (orow != nullptr) orow[j] = o;
    if (st != nullptr) store_dt(st, dt, st_at + j, o);
  }
}

unsigned norm_threads(int64_t n) {
  return n <= 128 ? 32 : 256;
}

__global__ void rmsnorm_k(const float* x, int64_t n, const float* w, float eps, bool offset, Dt dt,
                          float* out, void* st) {
  const float* xr = x + int64_t(blockIdx.x) * n;
  const float r = row_rms_inv(xr, n, eps);
  row_norm_out(xr, n, w, r, offset, dt, out + int64_t(blockIdx.x) * n, st, int64_t(blockIdx.x) * n);
}

// One pair of RoPE: lo' = round(round(lo * c_lo) + round(-hi * s_lo)), hi' = round(round(hi *
// c_hi) + round(lo * s_hi)). torch computes each product and the sum as kernels of their own, so
// no product is fused into the sum (__fmul_rn, __fadd_rn): left to nvcc, an fp32 run (where
// round is the identity) may get an FMA in one kernel and not in another.
__device__ __forceinline__ void rope_pair(float& lo, float& hi, float c_lo, float s_lo, float c_hi,
                                          float s_hi, Dt dt) {
  const float a0 = round_dt(__fmul_rn(lo, c_lo), dt), b0 = round_dt(__fmul_rn(-hi, s_lo), dt);
  const float a1 = round_dt(__fmul_rn(hi, c_hi), dt), b1 = round_dt(__fmul_rn(lo, s_hi), dt);
  lo = round_dt(__fadd_rn(a0, b0), dt);
  hi = round_dt(__fadd_rn(a1, b1), dt);
}

// One thread per (row, head, j < rot/2): both halves of the pair.
__global__ void rope_k(float* x, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot,
                       const float* cos, const float* sin, const int64_t* rowoff, int64_t shift,
                       const int64_t* dpos, Dt dt) {
  const int64_t half = rot / 2;
  if (dpos != nullptr) shift = dpos[0] * rot;  // a captured decode step: its position on the GPU
  FOR_EACH(i, rows * heads * half) {
    const int64_t j = i % half, rh = i / half, r = rh / heads;
    float* v = x + rh * head_dim;
    const float* c = cos + rowoff[r] + shift;
    const float* s = sin + rowoff[r] + shift;
    float lo = v[j], hi = v[j + half];
    rope_pair(lo, hi, c[j], s[j], c[j + half], s[j + half], dt);
    v[j] = lo;
    v[j + half] = hi;
  }
}

__global__ void add_round_k(const float* a, const float* b, int64_t n, Dt dt, float* out) {
  FOR_EACH(i, n) out[i] = round_dt(a[i] + b[i], dt);
}

// torch's CUDA silu: x / (1 + exp(-x)); gelu(approximate="tanh"): 0.5 x (1 + tanh(kBeta (x +
// kKappa x^3))) in fp32.
__device__ __forceinline__ float act_value(float x, int act) {
  if (act == 0) return x / (1.0f + expf(-x));
  // M_SQRT2 * M_2_SQRTPI * 0.5, as torch writes kBeta
  const float kBeta = float(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
  const float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * x * x * x);
  return 0.5f * x * (1.0f + tanhf(inner));
}

__global__ void act_mul_k(const float* g, const float* u, int64_t n, int act, Dt dt, float* out,
                          void* st) {
  FOR_EACH(i, n) {
    const float y = round_dt(round_dt(act_value(g[i], act), dt) * u[i], dt);
    out[i] = y;
    if (st != nullptr) store_dt(st, dt, i, y);
  }
}

// bias_round of a product's output element (RoundSegment's c_in, ctype, bias; element i of a row
// of cols).
__device__ __forceinline__ float rounded_product(const RoundSegment& s, int64_t i, Dt dt) {
  float x = load_dt(s.c_in, s.ctype, i);
  if (s.bias != nullptr) x = x + s.bias[i % s.cols];
  return round_dt(x, dt);
}
// rounded_product of element col of row r, through the segment's row stride (RoundSegment::ld).
__device__ __forceinline__ float rounded_at(const RoundSegment& s, int64_t r, int64_t col, Dt dt) {
  float x = load_dt(s.c_in, s.ctype, r * (s.ld != 0 ? s.ld : s.cols) + col);
  if (s.bias != nullptr) x = x + s.bias[col];
  return round_dt(x, dt);
}

// ---- a decode step's fused kernels (one token; each does in one launch what the launches they
// replace did, in the same order per element and with the same reductions) ----

// A block per head of q, then k, then v: bias_round of the product, q/k norm, RoPE at *pos, and
// for k and v the cache append (rmsnorm_k's block size, so the norm's sum is its).
__global__ void step_qkv_k(StepQkv a) {
  __shared__ float row[256];
  const int64_t b = blockIdx.x, D = a.head_dim, kvd = a.kv_heads * D;
  const int which = b < a.heads ? 0 : b < a.heads + a.kv_heads ? 1 : 2;
  const int64_t h = which == 0 ? b : which == 1 ? b - a.heads : b - a.heads - a.kv_heads;
  const RoundSegment& seg = a.proj.seg[which];
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x)
    row[j] = rounded_product(seg, h * D + j, a.dt);
  __syncthreads();
  const int64_t at = a.pos[0] * kvd + h * D;
  if (which == 2) {
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
      store_dt(a.vst, a.dt, at + j, row[j]);
      a.vf[at + j] = row[j];
    }
    return;
  }
  const float* nw = which == 0 ? a.q_norm : a.k_norm;
  if (nw != nullptr) {
    const float r = row_rms_inv(row, D, a.eps);
    row_norm_out(row, D, nw, r, a.offset, a.dt, row, nullptr, 0);
    __syncthreads();
  }
  const int64_t half = a.rot / 2;
  const float* c = a.cos + a.rowoff[0] + a.pos[0] * a.rot;
  const float* sn = a.sin + a.rowoff[0] + a.pos[0] * a.rot;
  for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
    float lo = row[j], hi = row[j + half];
    rope_pair(lo, hi, c[j], sn[j], c[j + half], sn[j + half], a.dt);
    row[j] = lo;
    row[j + half] = hi;
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    if (which == 0)
      a.q[h * D + j] = row[j];
    else
      store_dt(a.kst, a.dt, at + j, row[j]);
  }
}

// h = round(h + bias_round(product)), then out = RMSNorm(h) (and in storage): the residual and
// the next norm of a decode step, a block per row.
__global__ void residual_norm_k(float* h, RoundSegment p, int64_t n, const float* w, float eps,
                                bool offset, Dt dt, float* out, void* st) {
  const int64_t r0 = int64_t(blockIdx.x) * n;
  float* hr = h + r0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    hr[j] = round_dt(hr[j] + rounded_product(p, r0 + j, dt), dt);
  const float r = row_rms_inv(hr, n, eps);
  row_norm_out(hr, n, w, r, offset, dt, out != nullptr ? out + r0 : nullptr, st, r0);
}

// residual_norm_k with each thread's elements (j = threadIdx.x + k blockDim.x, k < kResidualRegs)
// in registers, every load issued before the first add: the loop above waits on one load at a
// time, since its store to h may alias the next load. The same sums in the same order.
constexpr int kResidualRegs = 16;
__global__ void residual_norm_reg_k(float* h, RoundSegment p, int n, const float* w, float eps,
                                    bool offset, Dt dt, float* out, void* st) {
  const int64_t r0 = int64_t(blockIdx.x) * n;
  float* hr = h + r0;
  const int tid = int(threadIdx.x), step = int(blockDim.x);
  float x[kResidualRegs], y[kResidualRegs];
#pragma unroll
  for (int k = 0; k < kResidualRegs; ++k) {
    const int j = tid + k * step;
    if (j < n) x[k] = hr[j], y[k] = load_dt(p.c_in, p.ctype, r0 + j);
  }
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < kResidualRegs; ++k) {
    const int j = tid + k * step;
    if (j >= n) break;
    if (p.bias != nullptr) y[k] = y[k] + p.bias[j];
    x[k] = round_dt(x[k] + round_dt(y[k], dt), dt);
    hr[j] = x[k];
    s = __fadd_rn(s, __fmul_rn(x[k], x[k]));
  }
  __shared__ float part[32];
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (tid % 32 == 0) part[tid / 32] = s;
  __syncthreads();
  if (tid < 32) {
    float t = tid < step / 32 ? part[tid] : 0.0f;
    for (int o = 16; o > 0; o /= 2) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (tid == 0) part[0] = t;
  }
  __syncthreads();
  const float r = rms_inv_of(part[0], n, eps);
#pragma unroll
  for (int k = 0; k < kResidualRegs; ++k) {
    const int j = tid + k * step;
    if (j >= n) break;
    const float o = norm_value(x[k], r, w[j], offset, dt);
    if (out != nullptr) out[r0 + j] = o;
    if (st != nullptr) store_dt(st, dt, r0 + j, o);
  }
}

// A row per (token, head of q, k or v): step_qkv_k's steps with the token's RoPE row and no
// cache, into storage; q's and k's site_stats when asked (a row only touches the shared maximum
// when it exceeds it: every row's atomic on one word cost more than the kernel). WARP: a warp
// per row, kPassRows rows a block (head_dim up to 128, where rmsnorm_k's block is one warp: the
// same sums); else a block of norm_threads per row. A block of 32 threads per row left the GPU
// waiting on its barriers (0.39 ms per Qwen3-4B layer at 8,192 tokens).
constexpr int kPassRows = 4;

template <bool WARP>
__global__ void pass_qkv_k(PassQkv a) {
  __shared__ float rows[WARP ? kPassRows : 1][WARP ? 128 : 256];
  const int64_t slots = a.heads + 2 * a.kv_heads, D = a.head_dim;
  const int64_t id = WARP ? int64_t(blockIdx.x) * kPassRows + threadIdx.x / 32 : blockIdx.x;
  if (WARP && id >= a.tokens * slots) return;  // the whole warp: nothing below syncs the block
  const int64_t me = WARP ? threadIdx.x % 32 : threadIdx.x, step = WARP ? 32 : blockDim.x;
  const auto sync = [] {
    if constexpr (WARP)
      __syncwarp();
    else
      __syncthreads();
  };
  float* row = rows[WARP ? threadIdx.x / 32 : 0];
  const int64_t t = id / slots, b = id % slots;
  const int which = b < a.heads ? 0 : b < a.heads + a.kv_heads ? 1 : 2;
  const int64_t h = which == 0 ? b : which == 1 ? b - a.heads : b - a.heads - a.kv_heads;
  const RoundSegment& seg = a.proj.seg[which];
  const int64_t at = t * seg.cols + h * D;
  void* dst = which == 0 ? a.q : which == 1 ? a.k : a.v;
  for (int64_t j = me; j < D; j += step) row[j] = rounded_at(seg, t, h * D + j, a.dt);
  sync();
  if (which == 2) {
    for (int64_t j = me; j < D; j += step) store_dt(dst, a.dt, at + j, row[j]);
    return;
  }
  const float* nw = which == 0 ? a.q_norm : a.k_norm;
  if (nw != nullptr) {
    const float r = WARP ? warp_rms_inv(row, D, a.eps) : row_rms_inv(row, D, a.eps);
    sync();  // every lane has read the row before it is overwritten
    for (int64_t j = me; j < D; j += step) row[j] = norm_value(row[j], r, nw[j], a.offset, a.dt);
    sync();
  }
  const int64_t half = a.rot / 2;
  const float* c = a.cos + a.rowoff[t];
  const float* sn = a.sin + a.rowoff[t];
  for (int64_t j = me; j < half; j += step) {
    float lo = row[j], hi = row[j + half];
    rope_pair(lo, hi, c[j], sn[j], c[j + half], sn[j + half], a.dt);
    row[j] = lo;
    row[j + half] = hi;
  }
  sync();
  float peak = 0.0f;
  bool bad = false;
  for (int64_t j = me; j < D; j += step) {
    const float x = row[j];
    store_dt(dst, a.dt, at + j, x);
    if (isfinite(x))
      peak = fmaxf(peak, fabsf(x));
    else
      bad = true;
  }
  if (a.stats == nullptr) return;
  for (int o = 16; o > 0; o /= 2) {
    peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, o));
    bad = __any_sync(0xffffffffu, bad);
  }
  if (threadIdx.x % 32 == 0) {
    SiteStats* st = a.stats + which;
    if (__float_as_uint(peak) > *static_cast<volatile unsigned*>(&st->peak_bits))
      atomicMax(&st->peak_bits, __float_as_uint(peak));
    if (bad) atomicOr(&st->nonfinite, 1u);
  }
}

// pass_qkv_k<true> with the row in registers: lane l holds elements l + 32 i, the strided order
// of warp_rms_inv's sum, and with the whole head rotated (rot == D, D 64 or 128) each RoPE pair
// (j, j + D / 2) sits in one lane. No shared memory, no barriers, 32-bit indices.
template <int D, bool BF16>
__global__ void __launch_bounds__(256) pass_qkv_reg_k(PassQkv a) {
  constexpr int NV = D / 32;
  constexpr Dt dt = BF16 ? Dt::BF16 : Dt::F16;
  const int slots = int(a.heads + 2 * a.kv_heads), lane = int(threadIdx.x % 32);
  const int id = int(blockIdx.x) * 8 + int(threadIdx.x / 32);
  if (id >= int(a.tokens) * slots) return;
  const int t = id / slots, b = id % slots;
  const int which = b < a.heads ? 0 : b < a.heads + a.kv_heads ? 1 : 2;
  const int h = which == 0 ? b : which == 1 ? b - int(a.heads) : b - int(a.heads + a.kv_heads);
  const RoundSegment& seg = a.proj.seg[which];
  const int64_t col = int64_t(h) * D + lane, at = int64_t(t) * seg.cols + col;
  uint16_t* dst = static_cast<uint16_t*>(which == 0 ? a.q : which == 1 ? a.k : a.v) + at;
  float x[NV];
  if (seg.ctype == dt && seg.bias == nullptr) {  // the product in storage: exact
    const uint16_t* src = static_cast<const uint16_t*>(seg.c_in) +
                          int64_t(t) * (seg.ld != 0 ? seg.ld : seg.cols) + col;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const uint16_t v = src[32 * i];
      x[i] = BF16 ? __uint_as_float(uint32_t(v) << 16) : __half2float(__ushort_as_half(v));
    }
  } else {
#pragma unroll
    for (int i = 0; i < NV; ++i) x[i] = rounded_at(seg, t, col + 32 * i, dt);
  }
  const auto store = [&](int i, float v) {
    if constexpr (BF16)
      dst[32 * i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    else
      dst[32 * i] = __half_as_ushort(__float2half_rn(v));
  };
  if (which == 2) {
#pragma unroll
    for (int i = 0; i < NV; ++i) store(i, x[i]);
    return;
  }
  const float* nw = which == 0 ? a.q_norm : a.k_norm;
  if (nw != nullptr) {
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < NV; ++i) sq = __fadd_rn(sq, __fmul_rn(x[i], x[i]));
    for (int o = 16; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    const float r = rms_inv_of(sq, D, a.eps);
#pragma unroll
    for (int i = 0; i < NV; ++i) x[i] = norm_value(x[i], r, nw[lane + 32 * i], a.offset, dt);
  }
  const float* c = a.cos + a.rowoff[t] + lane;
  const float* sn = a.sin + a.rowoff[t] + lane;
#pragma unroll
  for (int i = 0; i < NV / 2; ++i)
    rope_pair(x[i], x[i + NV / 2], c[32 * i], sn[32 * i], c[32 * i + D / 2], sn[32 * i + D / 2],
              dt);
  float peak = 0.0f;
  bool bad = false;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    store(i, x[i]);
    if (isfinite(x[i]))
      peak = fmaxf(peak, fabsf(x[i]));
    else
      bad = true;
  }
  if (a.stats == nullptr) return;
  for (int o = 16; o > 0; o /= 2) {
    peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, o));
    bad = __any_sync(0xffffffffu, bad);
  }
  if (lane == 0) {
    SiteStats* st = a.stats + which;
    if (__float_as_uint(peak) > *static_cast<volatile unsigned*>(&st->peak_bits))
      atomicMax(&st->peak_bits, __float_as_uint(peak));
    if (bad) atomicOr(&st->nonfinite, 1u);
  }
}

// act = round(round(f(bias_round(gate))) * bias_round(up)), and in storage.
__global__ void step_act_k(RoundSegment g, RoundSegment u, int64_t n, int act, Dt dt, float* out,
                           void* st) {
  FOR_EACH(i, n) {
    const int64_t r = i / g.cols, c = i % g.cols;
    const float y = round_dt(
        round_dt(act_value(rounded_at(g, r, c, dt), act), dt) * rounded_at(u, r, c, dt), dt);
    if (out != nullptr) out[i] = y;
    if (st != nullptr) store_dt(st, dt, i, y);
  }
}

// step_act_k where gate and up are products in the run dtype (bf16/fp16) without biases: 8
// elements a thread in 16-byte loads and stores (the scalar loop moved 1 TB/s).
// cols8, ld8: a row's vectors and the products' row stride in vectors (equal: one flat array).
template <bool BF16>
__global__ void step_act_vec_k(const uint4* g, const uint4* u, int64_t n8, int cols8, int ld8,
                               int act, float* out, uint4* st) {
  constexpr Dt dt = BF16 ? Dt::BF16 : Dt::F16;
  FOR_EACH(i, n8) {
    const int64_t src = cols8 == ld8 ? i : (i / cols8) * ld8 + i % cols8;
    const uint4 gv = g[src], uv = u[src];
    const uint32_t* gw = reinterpret_cast<const uint32_t*>(&gv);
    const uint32_t* uw = reinterpret_cast<const uint32_t*>(&uv);
    float y[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const uint16_t gb = uint16_t(gw[e / 2] >> (16 * (e % 2))),
                     ub = uint16_t(uw[e / 2] >> (16 * (e % 2)));
      const float gx =
          BF16 ? __uint_as_float(uint32_t(gb) << 16) : __half2float(__ushort_as_half(gb));
      const float ux =
          BF16 ? __uint_as_float(uint32_t(ub) << 16) : __half2float(__ushort_as_half(ub));
      y[e] = round_dt(round_dt(act_value(gx, act), dt) * ux, dt);
    }
    if (st != nullptr) {
      uint4 o;
      uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
      for (int e = 0; e < 4; ++e) ow[e] = pack_round<BF16>(y[2 * e], y[2 * e + 1]);
      st[i] = o;
    }
    if (out != nullptr) {
      reinterpret_cast<float4*>(out)[2 * i] = make_float4(y[0], y[1], y[2], y[3]);
      reinterpret_cast<float4*>(out)[2 * i + 1] = make_float4(y[4], y[5], y[6], y[7]);
    }
  }
}

__global__ void softcap_k(float* v, int64_t n, float cap, Dt dt) {
  FOR_EACH(i, n) {
    const float d = round_dt(v[i] / cap, dt);
    v[i] = round_dt(round_dt(tanhf(d), dt) * cap, dt);
  }
}

__global__ void site_stats_k(const float* v, int64_t n, SiteStats* st) {
  float peak = 0.0f;
  bool bad = false;
  FOR_EACH(i, n) {
    const float x = v[i];
    if (isfinite(x))
      peak = fmaxf(peak, fabsf(x));
    else
      bad = true;
  }
  for (int o = 16; o > 0; o /= 2) {
    peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, o));
    bad = __any_sync(0xffffffffu, bad);
  }
  if (threadIdx.x % 32 == 0) {
    atomicMax(&st->peak_bits, __float_as_uint(peak));
    if (bad) atomicOr(&st->nonfinite, 1u);
  }
}

__device__ __forceinline__ bool masked_key(int64_t i, int64_t j, int64_t window) {
  return j > i || (window > 0 && j <= i - window);
}

// eager_attention_forward's steps on a raw score before the mask: s = round(round(s) * scaling);
// soft-capping (Gemma 2) s = round(round(tanh(round(s / cap))) * cap).
__device__ __forceinline__ float eager_score(float raw, float scaling, float cap, Dt dt) {
  float x = round_dt(round_dt(raw, dt) * scaling, dt);
  if (cap > 0.0f) {
    x = round_dt(x / cap, dt);
    x = round_dt(tanhf(x), dt);
    x = round_dt(x * cap, dt);
  }
  return x;
}

// torch's softmax lanes for a row of L values: W = min(next_pow2(L), 32).
__device__ __forceinline__ int torch_softmax_lanes(int64_t L) {
  int W = 1;
  while (W < L && W < 32) W *= 2;
  return W;
}

// The max and the sum of torch's softmax for a row of L values s (PersistentSoftmax.cuh's lane
// layout, see eager_softmax_k): m is this lane's max over its elements j = lane, lane + W, ...;
// returns {row max, sum of exp(s_j - max)}, the same on every lane of the warp.
__device__ __forceinline__ float2 torch_softmax_stats(float m, const float* s, int64_t L, int W,
                                                      int lane) {
  for (int o = W / 2; o > 0; o /= 2) {
    const float b = __shfl_xor_sync(0xffffffffu, m, o);
    m = m < b ? b : m;
  }
  float sum = 0.0f;
  for (int64_t j = lane; lane < W && j < L; j += W) sum += expf(s[j] - m);
  for (int o = W / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  return make_float2(m, sum);
}

// One warp per score row. torch's softmax for rows up to 1024 (PersistentSoftmax.cuh) gives each
// row a group of W = min(next_pow2(T), 32) lanes, element j to lane j % W, a sequential sum per
// lane and then a butterfly over the W lanes, and divides exp(x - max) by the sum: the same here.
__global__ void eager_softmax_k(float* S, float* P, void* pstore, int64_t nmat, int64_t Tq,
                                int64_t T, int64_t c0, float scaling, float cap, int64_t window,
                                float mask, Dt dt, SiteStats* st) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= nmat * Tq) return;
  const int lane = threadIdx.x % 32;
  const int64_t i = c0 + row % Tq;  // the query's own column among the T keys
  float* s = S + row * T;
  float* p = P + row * T;
  const int W = torch_softmax_lanes(T);
  const bool active = lane < W;
  float m = -kInf;
  bool bad = false;
  float peak = 0.0f;
  for (int64_t j = lane; active && j < T; j += W) {
    const float raw = s[j];
    const bool hidden = masked_key(i, j, window);
    if (!hidden && isfinite(raw)) peak = fmaxf(peak, fabsf(raw));
    float x = eager_score(raw, scaling, cap, dt);
    if (hidden) x = round_dt(x + mask, dt);
    if (hidden ? (isnan(x) || x == kInf) : !isfinite(x)) bad = true;
    s[j] = x;
    m = m > x ? m : x;
  }
  if (st != nullptr) {
    for (int o = 16; o > 0; o /= 2) peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, o));
    bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) {
      atomicMax(&st->peak_bits, __float_as_uint(peak));
      if (bad) atomicOr(&st->nonfinite, 1u);
    }
  }
  const float2 ms = torch_softmax_stats(m, s, T, W, lane);
  m = ms.x;
  const float sum = ms.y;
  for (int64_t j = lane; active && j < T; j += W) {
    const float y = round_dt(expf(s[j] - m) / sum, dt);
    p[j] = y;
    if (pstore != nullptr) store_dt(pstore, dt, row * T + j, y);
  }
}

// exp2 as FlashAttention-2's kernels compute it (built with fast math there: ex2.approx).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

constexpr int kMaxDPerLane = 8;  // head_dim up to 256
constexpr int kKeysPerLane = 4;  // 128 keys per block of the online softmax

// One warp per (score row, i.e. sequence, head and query). The raw scores s = q.k come from the
// tensor-core product (as FlashAttention-2's MMA computes them); keys in blocks of 128: block max,
// the running max m, p = 2^(s * scale_log2 - m * scale_log2), the sum and accumulators rescaled
// when m grows, p rounded to the run dtype for p.v (fp32 accumulation, v read at its kv head);
// out = round(acc * (1 / l)).
__global__ void fused_softmax_pv_k(float* S, const float* v, int64_t nmat, int64_t Tq, int64_t T,
                                   int64_t c0, int64_t heads, int64_t kv_heads, int64_t D,
                                   const int64_t* seg_off, float scaling, int64_t window, Dt dt,
                                   float* ctx, float* P, SiteStats* st) {
  const int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (w >= nmat * Tq) return;
  const int lane = threadIdx.x % 32;
  const int64_t mat = w / Tq, qi = w % Tq, i = c0 + qi, h = mat % heads,
                kvh = h / (heads / kv_heads);
  const int64_t g0 = seg_off[mat / heads];
  const int64_t qd = heads * D, kvd = kv_heads * D;
  float* srow = S + w * T;
  const float scale_log2 = scaling * float(1.44269504088896340736) /* log2(e) */;
  const int nd = int((D + 31) / 32);
  float acc[kMaxDPerLane];
  for (int c = 0; c < kMaxDPerLane; ++c) acc[c] = 0.0f;
  float m = -kInf, l = 0.0f, peak = 0.0f;
  const int64_t jlo = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
  for (int64_t b0 = jlo; b0 <= i; b0 += 32 * kKeysPerLane) {
    float s[kKeysPerLane];
    float bmax = -kInf;
    for (int c = 0; c < kKeysPerLane; ++c) {
      const int64_t j = b0 + c * 32 + lane;
      s[c] = j <= i ? srow[j] : -kInf;
      if (j <= i && isfinite(s[c] * scaling)) peak = fmaxf(peak, fabsf(s[c] * scaling));
      bmax = fmaxf(bmax, s[c]);
    }
    for (int o = 16; o > 0; o /= 2) bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, o));
    const float mnew = fmaxf(m, bmax);
    const float ms = mnew == -kInf ? 0.0f : mnew * scale_log2;
    const float f = m == -kInf ? 0.0f : ex2_approx(m * scale_log2 - ms);
    l *= f;
    for (int c = 0; c < nd; ++c) acc[c] *= f;
    m = mnew;
    float pr[kKeysPerLane];
    for (int c = 0; c < kKeysPerLane; ++c) {
      const float e = ex2_approx(s[c] * scale_log2 - ms);
      l += e;
      pr[c] = round_dt(e, dt);
    }
    for (int c = 0; c < kKeysPerLane; ++c)
      for (int src = 0; src < 32; ++src) {
        const float pj = __shfl_sync(0xffffffffu, pr[c], src);
        const int64_t j = b0 + c * 32 + src;
        if (j > i) continue;  // uniform across the warp
        const float* vj = v + (g0 + j) * kvd + kvh * D;
        for (int cd = 0; cd < nd; ++cd) {
          const int64_t d = lane + 32 * cd;
          if (d < D) acc[cd] += pj * vj[d];
        }
      }
  }
  for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
  const float inv = 1.0f / l;
  float* o = ctx + (g0 + qi) * qd + h * D;
  for (int cd = 0; cd < nd; ++cd) {
    const int64_t d = lane + 32 * cd;
    if (d < D) o[d] = round_dt(acc[cd] * inv, dt);
  }
  if (st != nullptr) {
    for (int o2 = 16; o2 > 0; o2 /= 2) peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, o2));
    if (lane == 0) atomicMax(&st->peak_bits, __float_as_uint(peak));
  }
  if (P != nullptr) {  // the sites, in place of the raw scores: scaled scores and probabilities
    const float ms = m == -kInf ? 0.0f : m * scale_log2;
    float* prow = P + w * T;
    for (int64_t j = lane; j < T; j += 32) {
      const bool vis = j <= i && j >= jlo;
      const float sj = srow[j];
      srow[j] = vis ? sj * scaling : -kInf;
      prow[j] = vis ? ex2_approx(sj * scale_log2 - ms) * inv : 0.0f;
      if (vis && !isfinite(srow[j])) note_nonfinite(st);
    }
  }
}

// The attention of passes without a cache or sites (hidden's batches) in one launch per layer,
// FlashAttention-2's scheme on the tensor cores (mma.sync m16n8k16, fp32 accumulation) over
// every sequence of the pass. A block takes 64 queries of one sequence and one head (a warp 16 of
// them) and walks the sequence's keys a tile at a time, the next tile copied to shared memory
// (cp.async) while this one computes. Written here: no library computes variable-length causal
// attention with these roundings.
// - fused: FlashAttention-2's arithmetic (raw s = q.k, running max m, p = 2^(s * scale_log2 - m *
//   scale_log2), l summed unrounded, p rounded to the run dtype for p.v, out = acc * (1 / l)),
//   with its tiles: 128 keys up to head_dim 64, else 64, walked from the diagonal down, as
//   torch's FA2 kernels do on this GPU (the running max, hence the rescaling, follows them).
// - eager: eager_softmax's: x = eager_score(q.k) (rounded, scaled, capped as transformers'
//   eager), in three walks over the keys (the row's max; its sum of expf(x - m) in torch's
//   softmax order: lane j % W sums its keys in turn, then a butterfly over the W lanes; then
//   p = round(expf(x - m) / sum) and p.v), out = round(acc). Masked keys add nothing to the
//   sum (eager adds the dtype's lowest: exp() = 0), but a masked +inf or NaN score stays so
//   under that mask and makes the row NaN: the max walk scores every key of the sequence unless
//   `bound` shows that no score can overflow.
template <int D>
constexpr int kFlashKeys = D <= 64 ? 128 : 64;  // keys per tile
constexpr int kFlashPad = 8;  // elements after each shared row: conflict-free fragment loads

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices from shared memory, lane 8i + r giving row r's address of matrix i; TRANS
// hands each thread column-pairs instead of row-pairs (the B operand of p.v, V stored key-major).
// One instruction where 32-bit loads took four (K) or eight 16-bit ones (V).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* smem) {
  const unsigned a = unsigned(__cvta_generic_to_shared(smem));
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}

// transformers' max (torch's softmax: a NaN is passed over as the comparison is written).
__device__ __forceinline__ float torch_max(float m, float x) {
  return m > x ? m : x;
}

// The butterfly of torch's softmax sum over W lanes (torch_softmax_stats) on lane sums held as
// an mma accumulator holds a row: lane 8a + 2 tq + e in v[a][e] of the quad's thread tq. Each
// step adds lane r ^ o to lane r; a + b == b + a bit for bit, so both of a pair hold one value.
// Returns lane 0's result on every thread of the quad.
__device__ __forceinline__ float torch_lane_sum(float (&v)[4][2], int W, int lane) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {  // W / 2 down to 1 (unrolled: v stays in registers)
    if (o >= W) continue;
    float n[4][2];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float other;
        if (o >= 8)
          other = v[a ^ (o / 8)][e];
        else if (o >= 2)
          other = __shfl_xor_sync(0xffffffffu, v[a][e], o / 2);
        else
          other = v[a][e ^ 1];
        n[a][e] = v[a][e] + other;
      }
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int e = 0; e < 2; ++e) v[a][e] = n[a][e];
  }
  return __shfl_sync(0xffffffffu, v[0][0], lane & ~3);
}

// tiles[4 * blockIdx.x ..]: the sequence's first row, its length, the block's first query.
template <int D, bool BF16, bool EAGER>
__global__ void __launch_bounds__(128)
    flash_attention_k(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int32_t* tiles,
                      int heads, int kv_heads, float scaling, float cap, float mask, int window,
                      const SiteStats* bound, float* ctx, uint16_t* cst) {
  static_assert(D % 16 == 0, "ldmatrix pairs of 8-column tiles");
  constexpr int RS = D + kFlashPad;  // shared row stride, elements
  // The run dtype as a constant: round_dt and eager_score lose their per-element branch.
  constexpr Dt kdt = BF16 ? Dt::BF16 : Dt::F16;
  constexpr int BN = kFlashKeys<D>;
  extern __shared__ __align__(16) uint16_t flash_smem[];
  uint16_t* ks = flash_smem;                // [2][BN][RS]
  uint16_t* vs = flash_smem + 2 * BN * RS;  // [2][BN][RS]
  const int off = tiles[4 * blockIdx.x], len = tiles[4 * blockIdx.x + 1],
            q0 = tiles[4 * blockIdx.x + 2];
  const int h = int(blockIdx.y), kvh = h / (heads / kv_heads);
  const int64_t qd = int64_t(heads) * D, kvd = int64_t(kv_heads) * D;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, tq = lane % 4;
  const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // this thread's two query rows
  const float scale_log2 = scaling * float(1.44269504088896340736);

  uint32_t qa[D / 16][4];
  const bool in0 = r0 < len, in1 = r1 < len;  // rows of the sequence (else padding of the tile)
  {
    const uint16_t* q0p = q + int64_t(off + r0) * qd + h * D + tq * 2;
    const uint16_t* q1p = q0p + 8 * qd;
    const auto ld = [](bool in, const uint16_t* p) -> uint32_t {
      return in ? *reinterpret_cast<const uint32_t*>(p) : 0u;
    };
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qa[kk][0] = ld(in0, q0p + kk * 16);
      qa[kk][1] = ld(in1, q1p + kk * 16);
      qa[kk][2] = ld(in0, q0p + kk * 16 + 8);
      qa[kk][3] = ld(in1, q1p + kk * 16 + 8);
    }
  }
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m0 = -kInf, m1 = -kInf, l0 = 0.0f, l1 = 0.0f;

  const int qlast = min(q0 + int(kFlashQueries), len) - 1;
  const int klo = window > 0 ? max(0, q0 - window + 1) / BN : 0;
  const int khi = qlast / BN, ntile = khi - klo + 1;
  // The walks: eager's max over every key of the sequence (a masked key whose score is +inf or
  // NaN stays so under eager's additive mask and makes the row NaN), then its sum and its p.v
  // over the keys the queries see, each up the keys (torch's lanes sum in that order); the
  // fused profile's one walk down from the diagonal (FA2's). walk_of: {walk, tile, last of it}.
  // bound (eager): site_stats of the pass's q and k. Where both are finite and D * max |q| *
  // max |k| * scaling stays below half the dtype's largest value, no score can reach +inf or
  // NaN: the max walk then reads only the keys the queries see.
  bool bounded = false;
  if (EAGER && bound != nullptr && bound[0].nonfinite == 0 && bound[1].nonfinite == 0) {
    const double b = double(D) * double(__uint_as_float(bound[0].peak_bits)) *
                     double(__uint_as_float(bound[1].peak_bits)) * fmax(1.0, double(scaling));
    bounded = b < 0.5 * (kdt == Dt::F16 ? 65504.0 : 3.3895313892515355e38);
  }
  const int z0 = bounded ? klo : 0, n0 = EAGER ? (bounded ? ntile : (len - 1) / BN + 1) : 0;
  const auto walk_of = [&](int it) -> int3 {
    if (!EAGER) return make_int3(2, khi - it, it == ntile - 1);
    if (it < n0) return make_int3(0, z0 + it, it == n0 - 1);
    const int r = it - n0;
    return make_int3(1 + r / ntile, klo + r % ntile, r % ntile == ntile - 1);
  };
  bool poison0 = false, poison1 = false;  // eager: a masked +inf / NaN score in the row
  int W = 1;                              // torch's softmax lanes for a row of len keys
  while (W < len && W < 32) W *= 2;
  float ps0[4][2] = {}, ps1[4][2] = {};  // eager: torch's lane sums, lane 8a + 2 tq + e
  // The copy of a key tile: thread t moves 16 bytes of rows t / CH + i * RSTEP at column t % CH,
  // its addresses set up once (per-chunk index arithmetic was a quarter of eager's instructions).
  constexpr int CH = D / 8, RSTEP = 128 / CH, NLOAD = (BN + RSTEP - 1) / RSTEP;
  const int lrow = int(threadIdx.x) / CH, lcol = int(threadIdx.x) % CH;
  const int64_t lat = (int64_t(off) + lrow) * kvd + int64_t(kvh) * D + lcol * 8;
  const uint16_t* kg = k + lat;
  const uint16_t* vg = v + lat;
  const int lsm = lrow * RS + lcol * 8;
  const auto load = [&](int stage, int it) {
    const int3 wk = walk_of(it);
    const bool with_v = wk.x == 2;
    const int64_t t0 = int64_t(wk.y) * BN * kvd;
    const int lim = len - wk.y * BN - lrow;  // rows r < lim of the tile are keys of the sequence
    uint16_t* kd = ks + stage * BN * RS + lsm;
    uint16_t* vd = vs + stage * BN * RS + lsm;
    if (lrow < RSTEP)
#pragma unroll
      for (int i = 0; i < NLOAD; ++i) {
        const int r = i * RSTEP;
        if (BN % RSTEP != 0 && lrow + r >= BN) break;
        if (r < lim) {
          cp_async16(kd + r * RS, kg + t0 + r * kvd);
          if (with_v) cp_async16(vd + r * RS, vg + t0 + r * kvd);
        } else {
          *reinterpret_cast<uint4*>(kd + r * RS) = make_uint4(0, 0, 0, 0);
          if (with_v) *reinterpret_cast<uint4*>(vd + r * RS) = make_uint4(0, 0, 0, 0);
        }
      }
    asm volatile("cp.async.commit_group;");
  };
  const int iters = EAGER ? n0 + 2 * ntile : ntile;
  load(0, 0);
  for (int it = 0; it < iters; ++it) {
    const int3 wk = walk_of(it);
    const int stage = it & 1, walk = wk.x, kt = wk.y;
    const bool last = wk.z != 0;
    if (it + 1 < iters) {
      load(stage ^ 1, it + 1);
      asm volatile("cp.async.wait_group 1;");
    } else {
      asm volatile("cp.async.wait_group 0;");
    }
    __syncthreads();
    const uint16_t* kt_s = ks + stage * BN * RS;
    const uint16_t* vt_s = vs + stage * BN * RS;
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
    // ldmatrix: lane 8i + r addresses row r of matrix i (keys +8 for i >= 2, dims +8 for odd i).
    const int mi = lane / 8, mr = lane % 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int j = 0; j < BN / 8; j += 2) {
        uint32_t b[4];
        ldmatrix_x4<false>(b, kt_s + ((j + mi / 2) * 8 + mr) * RS + kk * 16 + (mi % 2) * 8);
        mma16816<BF16>(s[j], qa[kk], b[0], b[1]);
        mma16816<BF16>(s[j + 1], qa[kk], b[2], b[3]);
      }
    // The scores as each profile has them, -inf where the causal or sliding-window mask hides
    // the key. Eager's bounded max walk takes the raw maximum (eager_score is monotonic: the
    // maximum's score is the scores' maximum); tiles whose keys this warp's rows all see skip
    // the mask.
    if constexpr (EAGER) {
      if (walk != 0 || !bounded)
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = eager_score(s[j][e], scaling, cap, kdt);
    }
    const int wr = q0 + warp * 16;  // the warp's first row
    const bool all_see = kt * BN + BN - 1 <= wr && (window <= 0 || kt * BN > wr + 15 - window);
    if (!all_see)
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = kt * BN + j * 8 + tq * 2 + e;
          const bool see0 = key <= r0 && (window <= 0 || key > r0 - window),
                     see1 = key <= r1 && (window <= 0 || key > r1 - window);
          if (EAGER && walk == 0 && !bounded && key < len) {
            const float x0 = round_dt(s[j][e] + mask, kdt), x1 = round_dt(s[j][2 + e] + mask, kdt);
            poison0 |= !see0 && (isnan(x0) || x0 == kInf);
            poison1 |= !see1 && (isnan(x1) || x1 == kInf);
          }
          if (!see0) s[j][e] = -kInf;
          if (!see1) s[j][2 + e] = -kInf;
        }
    uint32_t pa[BN / 16][4];
    if constexpr (EAGER) {
      if (walk == 0) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            m0 = torch_max(m0, s[j][e]);
            m1 = torch_max(m1, s[j][2 + e]);
          }
        if (last)
#pragma unroll
          for (int x = 1; x < 4; x *= 2) {
            m0 = torch_max(m0, __shfl_xor_sync(0xffffffffu, m0, x));
            m1 = torch_max(m1, __shfl_xor_sync(0xffffffffu, m1, x));
            poison0 |= __shfl_xor_sync(0xffffffffu, int(poison0), x) != 0;
            poison1 |= __shfl_xor_sync(0xffffffffu, int(poison1), x) != 0;
          }
        if (last && bounded) {
          m0 = eager_score(m0, scaling, cap, kdt);
          m1 = eager_score(m1, scaling, cap, kdt);
        }
      } else if (walk == 1) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            // A masked key (-inf) adds expf(-inf) = +0: the sum stays bit for bit, branch-free.
            ps0[j % 4][e] += expf(s[j][e] - m0);
            ps1[j % 4][e] += expf(s[j][2 + e] - m1);
          }
        if (last) {
          l0 = torch_lane_sum(ps0, W, lane);
          l1 = torch_lane_sum(ps1, W, lane);
        }
      } else {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          float p[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float mm = e < 2 ? m0 : m1, ll = e < 2 ? l0 : l1;
            p[e] = expf(s[j][e] - mm) / ll;  // masked: +0, as above
          }
          pa[j / 2][(j % 2) * 2] = pack_round<BF16>(p[0], p[1]);
          pa[j / 2][(j % 2) * 2 + 1] = pack_round<BF16>(p[2], p[3]);
        }
      }
    } else {
      float t0 = -kInf, t1 = -kInf;  // the tile's row maxima
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          t0 = fmaxf(t0, s[j][e]);
          t1 = fmaxf(t1, s[j][2 + e]);
        }
#pragma unroll
      for (int x = 1; x < 4; x *= 2) {
        t0 = fmaxf(t0, __shfl_xor_sync(0xffffffffu, t0, x));
        t1 = fmaxf(t1, __shfl_xor_sync(0xffffffffu, t1, x));
      }
      const float n0 = fmaxf(m0, t0), n1 = fmaxf(m1, t1);
      const float ms0 = n0 == -kInf ? 0.0f : n0 * scale_log2,
                  ms1 = n1 == -kInf ? 0.0f : n1 * scale_log2;
      const float f0 = m0 == -kInf ? 0.0f : ex2_approx(m0 * scale_log2 - ms0),
                  f1 = m1 == -kInf ? 0.0f : ex2_approx(m1 * scale_log2 - ms1);
      m0 = n0, m1 = n1;
      l0 *= f0, l1 *= f1;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) o[n][0] *= f0, o[n][1] *= f0, o[n][2] *= f1, o[n][3] *= f1;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const float p00 = ex2_approx(s[j][0] * scale_log2 - ms0),
                    p01 = ex2_approx(s[j][1] * scale_log2 - ms0),
                    p10 = ex2_approx(s[j][2] * scale_log2 - ms1),
                    p11 = ex2_approx(s[j][3] * scale_log2 - ms1);
        l0 += p00;  // one at a time, as FA2's thread sums run
        l0 += p01;
        l1 += p10;
        l1 += p11;
        // The accumulator of keys [8j, 8j + 8) is half of the A operand of keys [16(j/2), +16).
        pa[j / 2][(j % 2) * 2] = pack_round<BF16>(p00, p01);
        pa[j / 2][(j % 2) * 2 + 1] = pack_round<BF16>(p10, p11);
      }
    }
    if (walk == 2)
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {  // matrices: keys +8 for odd i, dims +8 for i >= 2
          uint32_t b[4];
          ldmatrix_x4<true>(b, vt_s + (kk * 16 + (mi % 2) * 8 + mr) * RS + (n + mi / 2) * 8);
          mma16816<BF16>(o[n], pa[kk], b[0], b[1]);
          mma16816<BF16>(o[n + 1], pa[kk], b[2], b[3]);
        }
    __syncthreads();  // the next iteration's copy overwrites this stage
  }
  float i0 = 1.0f, i1 = 1.0f;
  if constexpr (!EAGER) {
#pragma unroll
    for (int x = 1; x < 4; x *= 2) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, x);
      l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
    i0 = 1.0f / l0, i1 = 1.0f / l1;
  }
  const int64_t c0 = int64_t(off + r0) * qd + h * D + tq * 2, c1 = c0 + 8 * qd;
  const auto out = [&](float x, float inv, bool poison) {
    return poison ? __int_as_float(0x7fc00000) : round_dt(EAGER ? x : x * inv, kdt);
  };
  if (cst != nullptr) {  // in storage (the values are rounded already: packing is exact)
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      if (in0)
        *reinterpret_cast<uint32_t*>(cst + c0 + n * 8) =
            pack_round<BF16>(out(o[n][0], i0, poison0), out(o[n][1], i0, poison0));
      if (in1)
        *reinterpret_cast<uint32_t*>(cst + c1 + n * 8) =
            pack_round<BF16>(out(o[n][2], i1, poison1), out(o[n][3], i1, poison1));
    }
    return;
  }
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    if (in0)
      *reinterpret_cast<float2*>(ctx + c0 + n * 8) =
          make_float2(out(o[n][0], i0, poison0), out(o[n][1], i0, poison0));
    if (in1)
      *reinterpret_cast<float2*>(ctx + c1 + n * 8) =
          make_float2(out(o[n][2], i1, poison1), out(o[n][3], i1, poison1));
  }
}

// A decode step's keys and values into the cache at row *pos (its position, on the GPU, so that
// one captured graph serves every step): k, v in storage, v also in fp32.
__global__ void cache_append_k(const float* k, const float* v, int64_t kvd, const int64_t* pos,
                               void* kst, void* vst, float* vf, Dt dt) {
  const int64_t at = pos[0] * kvd;
  FOR_EACH(i, kvd) {
    store_dt(kst, dt, at + i, k[i]);
    store_dt(vst, dt, at + i, v[i]);
    vf[at + i] = v[i];
  }
}

// One query (a decode step at position *pos) against the cached keys [lo, pos], lo = pos -
// (window - 1) for a sliding-window layer (what transformers' cache keeps), else 0: one block of
// kDecodeWarps warps per query head, so that a step's few heads still spread over many SMs' worth
// of threads (one warp per head cost ~1 us per cached key per step on Qwen3-4B). No mask is needed:
// every key read is visible.
//   scores  s_j = q.k_j in fp32, a warp per key (lanes over d, then a butterfly): not cuBLAS's
//           order, which differs in the last bits before eager's rounding and fused's fp32 scores;
//   eager   the score steps of eager_softmax_k, then its softmax in torch's lane layout for a row
//           of L keys (one warp), p = round(exp(x - m) / sum);
//   fused   FlashAttention-2's online softmax over blocks of 128 keys, each block's p rounded
//           against the running max M_b as there; the rescaling f_b = 2^(M_{b-1} - M_b) that the
//           online loop applies to everything before block b is folded into each key's weight
//           (F_b = product of the later f), so that keys can be summed in any split;
//   output  sum_j w_j v_j in fp32 over kDecodeWarps ordered partial sums; eager round(acc), fused
//           round(acc * (1 / l)).
constexpr int kDecodeWarps = 8;
constexpr int kDecodeBlocks = 512;  // blocks of 128 keys: up to 65,536 cached positions

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o /= 2) {
    const float b = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, b) : v + b;
  }
  __syncthreads();  // red may still be read from the previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = red[0];
  for (int w = 1; w < kDecodeWarps; ++w) t = is_max ? fmaxf(t, red[w]) : t + red[w];
  return t;
}

__global__ void __launch_bounds__(32 * kDecodeWarps)
    decode_attention_k(const float* q, const void* kc, const void* vc, const float* vf,
                       const int64_t* pos, int64_t heads, int64_t kv_heads, int64_t D,
                       float scaling, float cap, int64_t window, int fused, Dt dt, float* S,
                       int64_t sstride, float* ctx, void* cst) {
  __shared__ float qs[32 * kMaxDPerLane];
  __shared__ float part[kDecodeWarps][32 * kMaxDPerLane];
  __shared__ float red[kDecodeWarps];
  __shared__ float bscale[kDecodeBlocks];  // fused: M_b * log2(e) * scaling, then F_b
  __shared__ float bfold[kDecodeBlocks];
  __shared__ float stat[2];
  const int64_t h = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nt = blockDim.x;
  const int64_t P = pos[0], lo = window > 0 && P - (window - 1) > 0 ? P - (window - 1) : 0;
  const int64_t L = P + 1 - lo, kvh = h / (heads / kv_heads), kvd = kv_heads * D;
  float* s = S + h * sstride;
  for (int64_t d = threadIdx.x; d < D; d += nt) qs[d] = q[h * D + d];
  __syncthreads();
  for (int64_t j = warp; j < L; j += kDecodeWarps) {
    const int64_t row = (lo + j) * kvd + kvh * D;
    float acc = 0.0f;
    for (int64_t d = lane; d < D; d += 32) acc += qs[d] * load_dt(kc, dt, row + d);
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) s[j] = acc;
  }
  __syncthreads();
  float l = 1.0f;
  if (!fused) {
    for (int64_t j = threadIdx.x; j < L; j += nt) s[j] = eager_score(s[j], scaling, cap, dt);
    __syncthreads();
    if (warp == 0) {
      const int W = torch_softmax_lanes(L);
      const bool active = lane < W;
      float m = -kInf;
      for (int64_t j = lane; active && j < L; j += W) m = m > s[j] ? m : s[j];
      const float2 ms = torch_softmax_stats(m, s, L, W, lane);
      if (lane == 0) stat[0] = ms.x, stat[1] = ms.y;
    }
    __syncthreads();
    const float m = stat[0], sum = stat[1];
    for (int64_t j = threadIdx.x; j < L; j += nt) s[j] = round_dt(expf(s[j] - m) / sum, dt);
  } else {
    const float scale_log2 = scaling * float(1.44269504088896340736) /* log2(e) */;
    const int64_t nb = (L + 32 * kKeysPerLane - 1) / (32 * kKeysPerLane);
    for (int64_t b = warp; b < nb; b += kDecodeWarps) {
      float bmax = -kInf;
      for (int c = 0; c < kKeysPerLane; ++c) {
        const int64_t j = b * 32 * kKeysPerLane + c * 32 + lane;
        bmax = fmaxf(bmax, j < L ? s[j] : -kInf);
      }
      for (int o2 = 16; o2 > 0; o2 /= 2) bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, o2));
      if (lane == 0) bscale[b] = bmax;
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // the running max and the online loop's rescaling, in block order
      float m = -kInf;
      for (int64_t b = 0; b < nb; ++b) {
        const float mnew = fmaxf(m, bscale[b]);
        const float ms = mnew == -kInf ? 0.0f : mnew * scale_log2;
        bfold[b] = m == -kInf ? 0.0f : ex2_approx(m * scale_log2 - ms);  // f_b
        bscale[b] = ms;
        m = mnew;
      }
      float F = 1.0f;  // F_b: the product of f over the blocks after b
      for (int64_t b = nb - 1; b >= 0; --b) {
        const float f = bfold[b];
        bfold[b] = F;
        F *= f;
      }
    }
    __syncthreads();
    float lsum = 0.0f;
    for (int64_t j = threadIdx.x; j < L; j += nt) {
      const int64_t b = j / (32 * kKeysPerLane);
      const float e = ex2_approx(s[j] * scale_log2 - bscale[b]);
      lsum += bfold[b] * e;
      s[j] = bfold[b] * round_dt(e, dt);
    }
    l = block_reduce(lsum, false, red);
  }
  __syncthreads();
  const int nd = int((D + 31) / 32);
  float acc[kMaxDPerLane];
  for (int c = 0; c < kMaxDPerLane; ++c) acc[c] = 0.0f;
  const int64_t j0 = L * warp / kDecodeWarps, j1 = L * (warp + 1) / kDecodeWarps;
  for (int64_t j = j0; j < j1; ++j) {
    const float w = s[j];
    const int64_t row = (lo + j) * kvd + kvh * D;
    for (int cd = 0; cd < nd; ++cd) {
      const int64_t d = lane + 32 * cd;
      if (d < D) acc[cd] += w * (fused ? vf[row + d] : load_dt(vc, dt, row + d));
    }
  }
  for (int cd = 0; cd < nd; ++cd) part[warp][lane + 32 * cd] = acc[cd];
  __syncthreads();
  const float inv = 1.0f / l;
  for (int64_t d = threadIdx.x; d < D; d += nt) {
    float t = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) t += part[w][d];
    const float y = fused ? round_dt(t * inv, dt) : round_dt(t, dt);
    ctx[h * D + d] = y;
    if (cst != nullptr) store_dt(cst, dt, h * D + d, y);
  }
}

// ---- a product of one row (a decode step's) -----------------------------------------------------
// One warp per output row: lane l sums the 16-byte chunks l, l + 32, ... of w[r] . x in fp32 in
// chunk order (each chunk's elements in order), then the lanes' sums are added as a butterfly.
// The order is fixed by K alone (not by the grid), so every run gives the same bits. Written by
// hand because cuBLAS's kernels for one row left most of the bandwidth unused on the step's
// smaller products (docs/cuda.md); the weights stream through once, the input stays in L1.
template <typename E>
__device__ __forceinline__ float elem_f(E v) {
  if constexpr (std::is_same_v<E, __nv_bfloat16>)
    return __bfloat162float(v);
  else if constexpr (std::is_same_v<E, __half>)
    return __half2float(v);
  else
    return v;
}

template <typename E>
__device__ __forceinline__ float dot16(const uint4& a, const uint4& b, float acc) {
  constexpr int V = 16 / sizeof(E);
  const E* pa = reinterpret_cast<const E*>(&a);
  const E* pb = reinterpret_cast<const E*>(&b);
#pragma unroll
  for (int i = 0; i < V; ++i) acc = fmaf(elem_f(pa[i]), elem_f(pb[i]), acc);
  return acc;
}

// The lane's share of w[r] . x, reduced over the warp: every lane returns the row's sum.
// vec: every row and x start on 16 bytes (K a multiple of the chunk, aligned buffers), else one
// element at a time.
template <typename E>
__device__ __forceinline__ float warp_row_dot(const E* __restrict__ w, const E* __restrict__ x,
                                              int64_t K, int lane, bool vec) {
  constexpr int V = 16 / sizeof(E);
  float acc = 0.0f;
  if (vec) {
    const int64_t nv = K / V;
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    int64_t i = lane;
    // Four loads in flight per lane before their sums (the same order as one at a time).
    for (; i + 96 < nv; i += 128) {
      uint4 a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) a[u] = __ldcs(wv + i + 32 * u), b[u] = __ldg(xv + i + 32 * u);
#pragma unroll
      for (int u = 0; u < 4; ++u) acc = dot16<E>(a[u], b[u], acc);
    }
    for (; i < nv; i += 32) acc = dot16<E>(__ldcs(wv + i), __ldg(xv + i), acc);
  } else {
    for (int64_t k = lane; k < K; k += 32) acc = fmaf(elem_f(w[k]), elem_f(x[k]), acc);
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  return acc;
}

template <typename E>
__global__ void gemv_k(const E* __restrict__ x, int64_t K, GemvJobs jobs, int64_t total, bool vec) {
  const int lane = int(threadIdx.x % 32);
  int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (r >= total) return;
  // The job by comparisons, not an index: an indexed kernel parameter goes to local memory.
  const int64_t end0 = jobs.job[0].rows, end1 = end0 + jobs.job[1].rows;
  const GemvJob g = r < end0 ? jobs.job[0] : r < end1 ? jobs.job[1] : jobs.job[2];
  r -= r < end0 ? 0 : r < end1 ? end0 : end1;
  const float s = warp_row_dot(static_cast<const E*>(g.w) + r * K, x, K, lane, vec);
  if (lane == 0) store_dt(g.out, g.otype, r, s);
}

// gate and up rows r of one input and their activation (step_act's formula on the rounded
// products), one warp per r.
template <typename E>
__global__ void gemv_act_k(const E* __restrict__ x, int64_t K, const E* __restrict__ wg,
                           const E* __restrict__ wu, int64_t n, int act, Dt dt, float* out,
                           void* st, bool vec) {
  const int lane = int(threadIdx.x % 32);
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (r >= n) return;
  const float g = round_dt(warp_row_dot(wg + r * K, x, K, lane, vec), dt);
  const float u = round_dt(warp_row_dot(wu + r * K, x, K, lane, vec), dt);
  if (lane != 0) return;
  const float y = round_dt(round_dt(act_value(g, act), dt) * u, dt);
  out[r] = y;
  if (st != nullptr) store_dt(st, dt, r, y);
}

}  // namespace

void to_storage(const float* x, void* out, int64_t n, Dt dt) {
  to_storage_k<<<blocks_for(n, 256), 256, 0, g_stream>>>(x, out, n, dt);
  check_launch("to_storage");
}

void convert(const void* src, Dt sdt, void* dst, Dt ddt, int64_t n) {
  convert_k<<<blocks_for(n, 256), 256, 0, g_stream>>>(src, sdt, dst, ddt, n);
  check_launch("convert");
}

void bias_round(const void* c_in, Dt ctype, const float* bias, int64_t rows, int64_t cols, Dt dt,
                float* out) {
  bias_round_k<<<blocks_for(rows * cols, 256), 256, 0, g_stream>>>(c_in, ctype, bias, rows, cols,
                                                                   dt, out);
  check_launch("bias_round");
}

void bias_round_many(const RoundSegments& segs, int64_t rows, Dt dt) {
  if (segs.n == 0) return;
  int64_t most = 0;
  for (int k = 0; k < segs.n; ++k) most = std::max(most, rows * segs.seg[k].cols);
  // Enough blocks to fill the GPU several times over; each thread strides over the rest.
  const unsigned bx = std::min(blocks_for(most, 256), sm_count() * 32u / unsigned(segs.n) + 1u);
  bias_round_many_k<<<dim3(bx, unsigned(segs.n)), 256, 0, g_stream>>>(segs, rows, dt);
  check_launch("bias_round_many");
}

void rmsnorm(const float* x, int64_t rows, int64_t n, const float* w, float eps, bool offset, Dt dt,
             float* out, void* storage) {
  if (rows == 0) return;
  rmsnorm_k<<<unsigned(rows), norm_threads(n), 0, g_stream>>>(x, n, w, eps, offset, dt, out,
                                                              storage);
  check_launch("rmsnorm");
}

void step_qkv(const StepQkv& a) {
  if (a.head_dim > 256) throw std::runtime_error("step_qkv: head_dim above 256");
  step_qkv_k<<<unsigned(a.heads + 2 * a.kv_heads), norm_threads(a.head_dim), 0, g_stream>>>(a);
  check_launch("step_qkv");
}

void pass_qkv(const PassQkv& a) {
  if (a.head_dim > 256) throw std::runtime_error("pass_qkv: head_dim above 256");
  const int64_t blocks = a.tokens * (a.heads + 2 * a.kv_heads);
  if (blocks <= 0) return;
  if (blocks > (int64_t(1) << 31) - 1) throw std::runtime_error("pass_qkv: too many rows");
  const bool reg = (a.head_dim == 64 || a.head_dim == 128) && a.rot == a.head_dim &&
                   a.dt != Dt::F32 && blocks <= (int64_t(1) << 31) - 8;
  if (reg) {
    const auto go = [&](auto d, auto bf) {
      pass_qkv_reg_k<decltype(d)::value, decltype(bf)::value>
          <<<unsigned((blocks + 7) / 8), 256, 0, g_stream>>>(a);
    };
    const bool bf = a.dt == Dt::BF16;
    if (a.head_dim == 64 && bf) go(std::integral_constant<int, 64>{}, std::true_type{});
    if (a.head_dim == 64 && !bf) go(std::integral_constant<int, 64>{}, std::false_type{});
    if (a.head_dim == 128 && bf) go(std::integral_constant<int, 128>{}, std::true_type{});
    if (a.head_dim == 128 && !bf) go(std::integral_constant<int, 128>{}, std::false_type{});
  } else if (norm_threads(a.head_dim) == 32)
    pass_qkv_k<true>
        <<<unsigned((blocks + kPassRows - 1) / kPassRows), 32 * kPassRows, 0, g_stream>>>(a);
  else
    pass_qkv_k<false><<<unsigned(blocks), norm_threads(a.head_dim), 0, g_stream>>>(a);
  check_launch("pass_qkv");
}

void residual_norm(float* h, const RoundSegment& product, int64_t rows, int64_t n, const float* w,
                   float eps, bool offset, Dt dt, float* out, void* storage) {
  const unsigned threads = norm_threads(n);
  if (product.ld == 0 && product.cols == n && n <= int64_t(threads) * kResidualRegs)
    residual_norm_reg_k<<<unsigned(rows), threads, 0, g_stream>>>(h, product, int(n), w, eps,
                                                                  offset, dt, out, storage);
  else
    residual_norm_k<<<unsigned(rows), threads, 0, g_stream>>>(h, product, n, w, eps, offset, dt,
                                                              out, storage);
  check_launch("residual_norm");
}

namespace {
// Whether rows of K elements of dt, starting at these pointers, all start on 16 bytes.
bool chunked(int64_t K, Dt dt, std::initializer_list<const void*> ps) {
  if ((K * dt_bytes(dt)) % 16 != 0) return false;
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// fn(E{}) with E the element type of dt's storage: the gemv launchers' one dispatch.
template <typename Fn>
void with_elem(Dt dt, Fn&& fn) {
  if (dt == Dt::BF16)
    fn(__nv_bfloat16{});
  else if (dt == Dt::F16)
    fn(__half{});
  else
    fn(float{});
}
}  // namespace

void gemv(const void* x, int64_t K, const GemvJobs& jobs, Dt dt) {
  int64_t total = 0;
  bool vec = chunked(K, dt, {x});
  for (int j = 0; j < jobs.n; ++j)
    total += jobs.job[j].rows, vec = vec && chunked(K, dt, {jobs.job[j].w});
  if (total == 0) return;
  constexpr int kThreads = 256;  // 8 rows per block
  with_elem(dt, [&](auto e) {
    using E = decltype(e);
    gemv_k<<<blocks_for(total * 32, kThreads), kThreads, 0, g_stream>>>(static_cast<const E*>(x), K,
                                                                        jobs, total, vec);
  });
  check_launch("gemv");
}

void gemv_act(const void* x, int64_t K, const void* wg, const void* wu, int64_t n, int act, Dt dt,
              float* out, void* storage) {
  constexpr int kThreads = 256;
  const bool vec = chunked(K, dt, {x, wg, wu});
  with_elem(dt, [&](auto e) {
    using E = decltype(e);
    gemv_act_k<<<blocks_for(n * 32, kThreads), kThreads, 0, g_stream>>>(
        static_cast<const E*>(x), K, static_cast<const E*>(wg), static_cast<const E*>(wu), n, act,
        dt, out, storage, vec);
  });
  check_launch("gemv_act");
}

void step_act(const RoundSegment& gate, const RoundSegment& up, int64_t n, int act, Dt dt,
              float* out, void* storage) {
  const auto al16 = [](const void* p) { return p == nullptr || uintptr_t(p) % 16 == 0; };
  const int64_t ld = gate.ld != 0 ? gate.ld : gate.cols;
  if ((up.ld != 0 ? up.ld : up.cols) != ld || up.cols != gate.cols || n % gate.cols != 0)
    throw std::logic_error("step_act: gate and up of one shape");
  if (dt != Dt::F32 && gate.ctype == dt && up.ctype == dt && gate.bias == nullptr &&
      up.bias == nullptr && gate.cols % 8 == 0 && ld % 8 == 0 && ld < (int64_t(1) << 31) &&
      al16(gate.c_in) && al16(up.c_in) && al16(out) && al16(storage)) {
    const auto* g = static_cast<const uint4*>(gate.c_in);
    const auto* u = static_cast<const uint4*>(up.c_in);
    auto* st = static_cast<uint4*>(storage);
    const int c8 = int(gate.cols / 8), l8 = int(ld / 8);
    if (dt == Dt::BF16)
      step_act_vec_k<true>
          <<<blocks_for(n / 8, 256), 256, 0, g_stream>>>(g, u, n / 8, c8, l8, act, out, st);
    else
      step_act_vec_k<false>
          <<<blocks_for(n / 8, 256), 256, 0, g_stream>>>(g, u, n / 8, c8, l8, act, out, st);
  } else {
    step_act_k<<<blocks_for(n, 256), 256, 0, g_stream>>>(gate, up, n, act, dt, out, storage);
  }
  check_launch("step_act");
}

void rope(float* x, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot, const float* cos,
          const float* sin, const int64_t* rowoff, Dt dt, int64_t shift, const int64_t* dpos) {
  rope_k<<<blocks_for(rows * heads * (rot / 2), 256), 256, 0, g_stream>>>(
      x, rows, heads, head_dim, rot, cos, sin, rowoff, shift, dpos, dt);
  check_launch("rope");
}

void add_round(const float* a, const float* b, int64_t n, Dt dt, float* out) {
  add_round_k<<<blocks_for(n, 256), 256, 0, g_stream>>>(a, b, n, dt, out);
  check_launch("add_round");
}

// PeftModel's LoRA add, as torch computes `result + lora * scaling` then `.to(dtype)`: the product
// times scale in fp32, added in fp32, one rounding; no FMA (torch's two kernels round twice).
// DoRA (m per output row): e = (m - 1) * base + (m * lo) * scale, base = y less the base layer's
// bias rounded to the run dtype (peft subtracts it in that dtype), y = round(y + e).
__global__ void lora_add_k(float* y, const float* lo, int64_t n, int64_t rows, float scale, Dt dt,
                           const float* m, const float* bias) {
  FOR_EACH(i, n) {
    if (m == nullptr) {
      y[i] = round_dt(__fadd_rn(y[i], __fmul_rn(lo[i], scale)), dt);
    } else {
      const int64_t j = i % rows;
      const float base = bias != nullptr ? round_dt(__fsub_rn(y[i], bias[j]), dt) : y[i];
      const float e = __fadd_rn(__fmul_rn(__fsub_rn(m[j], 1.0f), base),
                                __fmul_rn(__fmul_rn(m[j], lo[i]), scale));
      y[i] = round_dt(__fadd_rn(y[i], e), dt);
    }
  }
}

void lora_add(float* y, const float* lo, int64_t n, int64_t rows, float scale, Dt dt,
              const float* m, const float* bias) {
  lora_add_k<<<blocks_for(n, 256), 256, 0, g_stream>>>(y, lo, n, rows, scale, dt, m, bias);
  check_launch("lora_add");
}

__global__ void fill_rows_k(const float* v, int64_t rows, int64_t n, float* out) {
  FOR_EACH(i, n) out[i] = v[i % rows];
}

void fill_rows(const float* v, int64_t rows, int64_t T, float* out) {
  fill_rows_k<<<blocks_for(T * rows, 256), 256, 0, g_stream>>>(v, rows, T * rows, out);
  check_launch("fill_rows");
}

void act_mul(const float* g, const float* u, int64_t n, int act, Dt dt, float* out, void* storage) {
  act_mul_k<<<blocks_for(n, 256), 256, 0, g_stream>>>(g, u, n, act, dt, out, storage);
  check_launch("act_mul");
}

// A thread per column of one sequence: its positions in order, as pool_state (tools/hidden.cpp)
// adds them on the host, so that the GPU's pooled state is the host's pooling of the GPU's state
// bit for bit (IEEE adds and division: nvcc's defaults, no contraction possible here). Both pools
// and the finite flag in one read of the rows (a read per pool read every state twice).
__global__ void pool_states_k(const float* x, const int64_t* off, const int64_t* len, int64_t H,
                              float* last, float* mean, unsigned int* nonfinite) {
  const int64_t s = blockIdx.y, c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= H) return;
  const float* p = x + off[s] * H + c;
  const int64_t T = len[s];
  float sum = 0.0f;
  bool bad = false;
  int64_t t = 0;
  // Sixteen rows loaded before they are summed (in order): few loads in flight per thread left
  // the copy waiting on memory (a batch has some thirty sequences, so some 600 blocks).
  constexpr int kAhead = 16;
  for (; t + kAhead <= T; t += kAhead) {
    float v[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) v[u] = p[(t + u) * H];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      bad |= !isfinite(v[u]);
      sum = __fadd_rn(sum, v[u]);
    }
  }
  for (; t < T; ++t) {
    const float v = p[t * H];
    bad |= !isfinite(v);
    sum = __fadd_rn(sum, v);
  }
  if (mean != nullptr) mean[s * H + c] = __fdiv_rn(sum, float(T));
  if (last != nullptr) last[s * H + c] = p[(T - 1) * H];
  if (bad) atomicOr(&nonfinite[s], 1u);
}

void pool_states(const float* x, const int64_t* off, const int64_t* len, int64_t seqs, int64_t H,
                 float* last, float* mean, unsigned int* nonfinite) {
  for (int64_t s0 = 0; s0 < seqs; s0 += 65535) {  // gridDim.y's limit
    const dim3 grid(unsigned((H + 127) / 128), unsigned(std::min<int64_t>(65535, seqs - s0)));
    pool_states_k<<<grid, 128, 0, g_stream>>>(
        x, off + s0, len + s0, H, last != nullptr ? last + s0 * H : nullptr,
        mean != nullptr ? mean + s0 * H : nullptr, nonfinite + s0);
    check_launch("pool_states");
  }
}

// A row per token: the table's row (already in the run dtype's storage: exact), times Gemma's
// scale rounded once as scale_embeddings does (model/arch.cpp).
__global__ void embed_rows_k(const void* table, Dt dt, const int64_t* ids, int64_t H, float scale,
                             float* out) {
  const int64_t t = blockIdx.x, row = ids[t];
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
    const float x = load_dt(table, dt, row * H + c);
    out[t * H + c] = scale != 0.0f ? round_dt(__fmul_rn(x, scale), dt) : x;
  }
}

void embed_rows(const void* table, Dt dt, const int64_t* ids, int64_t T, int64_t H, float scale,
                float* out) {
  embed_rows_k<<<unsigned(T), 256, 0, g_stream>>>(table, dt, ids, H, scale, out);
  check_launch("embed_rows");
}

// The first index of the largest value (generate's argmax: a later equal value never wins), and
// whether every value is finite, in two launches: kArgmaxParts blocks reduce strided slices of
// the row into partials, one block reduces those. One block over a 151,936-logit row took 72 us
// a step on the H200: a single SM reading the row.
constexpr int kArgmaxParts = 128, kArgmaxThreads = 256;

__device__ inline bool argmax_better(float x, int64_t i, float y, int64_t j) {
  return j < 0 || (i >= 0 && (x > y || (x == y && i < j)));
}

// The block's best (value, first index) into thread 0's (best, at).
__device__ void block_argmax(float& best, int64_t& at) {
  __shared__ float bv[32];
  __shared__ int64_t bi[32];
  for (int o = 16; o > 0; o /= 2) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, at, o);
    if (argmax_better(ob, oi, best, at)) best = ob, at = oi;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) bv[warp] = best, bi[warp] = at;
  __syncthreads();
  if (warp == 0) {
    best = lane < warps ? bv[lane] : -kInf;
    at = lane < warps ? bi[lane] : -1;
    for (int o = 16; o > 0; o /= 2) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, at, o);
      if (argmax_better(ob, oi, best, at)) best = ob, at = oi;
    }
  }
}

// Partial p: the best of v[i] for i = p * threads + t + k * parts * threads.
__global__ void argmax_part_k(const float* v, int64_t n, float* pv, int64_t* pi, int* pbad) {
  __shared__ int bad_any;
  if (threadIdx.x == 0) bad_any = 0;
  __syncthreads();
  float best = -kInf;
  int64_t at = -1;
  bool bad = false;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float x = v[i];
    bad |= !isfinite(x);
    if (at < 0 || x > best) best = x, at = i;
  }
  if (bad) atomicOr(&bad_any, 1);
  block_argmax(best, at);
  if (threadIdx.x == 0) pv[blockIdx.x] = best, pi[blockIdx.x] = at, pbad[blockIdx.x] = bad_any;
}

__global__ void argmax_final_k(const float* pv, const int64_t* pi, const int* pbad, int parts,
                               int64_t* out) {
  __shared__ int bad_any;
  if (threadIdx.x == 0) bad_any = 0;
  __syncthreads();
  float best = -kInf;
  int64_t at = -1;
  for (int p = threadIdx.x; p < parts; p += blockDim.x) {
    if (pbad[p]) atomicOr(&bad_any, 1);
    if (argmax_better(pv[p], pi[p], best, at)) best = pv[p], at = pi[p];
  }
  __syncthreads();
  block_argmax(best, at);
  if (threadIdx.x == 0) out[0] = at, out[1] = bad_any;
}

size_t argmax_scratch_bytes() {
  return size_t(kArgmaxParts) * (sizeof(float) + sizeof(int64_t) + sizeof(int));
}

void argmax_finite(const float* v, int64_t n, int64_t* out, void* scratch) {
  auto* pi = static_cast<int64_t*>(scratch);  // int64 first: aligned
  auto* pv = reinterpret_cast<float*>(pi + kArgmaxParts);
  auto* pbad = reinterpret_cast<int*>(pv + kArgmaxParts);
  argmax_part_k<<<kArgmaxParts, kArgmaxThreads, 0, g_stream>>>(v, n, pv, pi, pbad);
  check_launch("argmax_finite");
  argmax_final_k<<<1, kArgmaxParts, 0, g_stream>>>(pv, pi, pbad, kArgmaxParts, out);
  check_launch("argmax_finite");
}

void softcap(float* v, int64_t n, float cap, Dt dt) {
  softcap_k<<<blocks_for(n, 256), 256, 0, g_stream>>>(v, n, cap, dt);
  check_launch("softcap");
}

void site_stats(const float* v, int64_t n, SiteStats* st) {
  const unsigned b = blocks_for(n, 256), grid = std::min(b, 1024u);
  site_stats_k<<<grid, 256, 0, g_stream>>>(v, n, st);
  check_launch("site_stats");
}

void eager_softmax(float* S, float* P, void* pstore, int64_t nmat, int64_t Tq, int64_t T,
                   int64_t c0, float scaling, float cap, int64_t window, float mask, Dt dt,
                   SiteStats* st) {
  const int64_t rows = nmat * Tq;
  eager_softmax_k<<<blocks_for(rows * 32, 256), 256, 0, g_stream>>>(
      S, P, pstore, nmat, Tq, T, c0, scaling, cap, window, mask, dt, st);
  check_launch("eager_softmax");
}

void fused_softmax_pv(float* S, const float* v, int64_t nmat, int64_t Tq, int64_t T, int64_t c0,
                      int64_t heads, int64_t kv_heads, int64_t D, const int64_t* seg_off,
                      float scaling, int64_t window, Dt dt, float* ctx, float* P, SiteStats* st) {
  if (D > 32 * kMaxDPerLane) throw std::runtime_error("fused attention: head_dim above 256");
  fused_softmax_pv_k<<<blocks_for(nmat * Tq * 32, 128), 128, 0, g_stream>>>(
      S, v, nmat, Tq, T, c0, heads, kv_heads, D, seg_off, scaling, window, dt, ctx, P, st);
  check_launch("fused_softmax_pv");
}

namespace {
// The head sizes flash_attention is built for: up to 128 (beyond, the accumulators and q's
// fragments no longer fit the registers). fn(std::integral_constant<int, D>) for the one that
// is D; false where none is.
template <class Fn, int... Ds>
bool with_head_dim_of(int64_t D, Fn& fn, std::integer_sequence<int, Ds...>) {
  return ((D == Ds ? (fn(std::integral_constant<int, Ds>{}), true) : false) || ...);
}
template <class Fn>
bool with_flash_head_dim(int64_t D, Fn&& fn) {
  return with_head_dim_of(D, fn, std::integer_sequence<int, 16, 32, 64, 80, 96, 128>{});
}

template <int D, bool BF16, bool EAGER>
void flash_launch(const void* q, const void* k, const void* v, const int32_t* tiles, int64_t ntiles,
                  int64_t heads, int64_t kv_heads, float scaling, float cap, float mask,
                  int64_t window, const SiteStats* bound, float* ctx, void* cst) {
  constexpr size_t smem = size_t(4 * kFlashKeys<D> * (D + kFlashPad)) * sizeof(uint16_t);
  static const bool attr = [] {
    return cudaFuncSetAttribute(flash_attention_k<D, BF16, EAGER>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                int(smem)) == cudaSuccess;
  }();
  if (!attr) throw std::runtime_error("flash attention: shared memory attribute");
  flash_attention_k<D, BF16, EAGER>
      <<<dim3(unsigned(ntiles), unsigned(heads)), 128, smem, g_stream>>>(
          static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k),
          static_cast<const uint16_t*>(v), tiles, int(heads), int(kv_heads), scaling, cap, mask,
          int(window), bound, ctx, static_cast<uint16_t*>(cst));
}
}  // namespace

bool flash_attention_supports(int64_t D, Dt dt) {
  return (dt == Dt::BF16 || dt == Dt::F16) && with_flash_head_dim(D, [](auto) {});
}

void flash_attention(const void* q, const void* k, const void* v, const int32_t* tiles,
                     int64_t ntiles, int64_t heads, int64_t kv_heads, int64_t D, bool eager,
                     float scaling, float cap, float mask, int64_t window, Dt dt,
                     const SiteStats* bound, float* ctx, void* ctx_storage) {
  if (!flash_attention_supports(D, dt))
    throw std::logic_error("flash_attention: head_dim or dtype not supported");
  if (ntiles <= 0) return;
  if (ntiles > (int64_t(1) << 31) - 1 || heads > 65535)
    throw std::runtime_error("flash attention: too many query tiles or heads");
  with_flash_head_dim(D, [&](auto d) {
    constexpr int Dc = decltype(d)::value;
    const auto go = [&](auto bf, auto eg) {
      flash_launch<Dc, decltype(bf)::value, decltype(eg)::value>(q, k, v, tiles, ntiles, heads,
                                                                 kv_heads, scaling, cap, mask,
                                                                 window, bound, ctx, ctx_storage);
    };
    const bool bf = dt == Dt::BF16;
    if (bf && eager) go(std::true_type{}, std::true_type{});
    if (bf && !eager) go(std::true_type{}, std::false_type{});
    if (!bf && eager) go(std::false_type{}, std::true_type{});
    if (!bf && !eager) go(std::false_type{}, std::false_type{});
  });
  check_launch("flash_attention");
}

void set_stream(void* stream) {
  g_stream = static_cast<cudaStream_t>(stream);
}

void cache_append(const float* k, const float* v, int64_t kvd, const int64_t* pos, void* kst,
                  void* vst, float* vf, Dt dt) {
  cache_append_k<<<blocks_for(kvd, 256), 256, 0, g_stream>>>(k, v, kvd, pos, kst, vst, vf, dt);
  check_launch("cache_append");
}

void decode_attention(const float* q, const void* kc, const void* vc, const float* vf,
                      const int64_t* pos, int64_t heads, int64_t kv_heads, int64_t D, float scaling,
                      float cap, int64_t window, bool fused, Dt dt, float* S, int64_t sstride,
                      float* ctx, void* ctx_storage) {
  if (D > 32 * kMaxDPerLane) throw std::runtime_error("decode attention: head_dim above 256");
  // The cache's capacity bounds every step's keys (the caller's sstride).
  if (sstride > int64_t(kDecodeBlocks) * 32 * kKeysPerLane)
    throw std::runtime_error("decode attention: more than 65,536 cached positions");
  decode_attention_k<<<unsigned(heads), 32 * kDecodeWarps, 0, g_stream>>>(
      q, kc, vc, vf, pos, heads, kv_heads, D, scaling, cap, window, fused ? 1 : 0, dt, S, sstride,
      ctx, ctx_storage);
  check_launch("decode_attention");
}

}  // namespace nanscope::cuda
