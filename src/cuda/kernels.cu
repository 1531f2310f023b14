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
#include <stdexcept>
#include <string>

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

unsigned blocks_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > (1ll << 30) ? (1ll << 30) : b));
}

__device__ __forceinline__ float round_dt(float x, Dt dt) {
  if (dt == Dt::BF16) return __bfloat162float(__float2bfloat16_rn(x));
  if (dt == Dt::F16) return __half2float(__float2half_rn(x));
  return x;
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

__global__ void bias_round_k(const void* c, Dt ctype, const float* bias, int64_t rows, int64_t cols,
                             Dt dt, float* out) {
  FOR_EACH(i, rows * cols) {
    float x = load_dt(c, ctype, i);
    if (bias != nullptr) x = x + bias[i % cols];
    out[i] = round_dt(x, dt);
  }
}

// One block of 256 threads per row: fp32 sum of squares (a tree, as torch's reductions; the order
// is not torch's exactly), rsqrtf as torch.rsqrt on CUDA.
__global__ void rmsnorm_k(const float* x, int64_t n, const float* w, float eps, bool offset, Dt dt,
                          float* out) {
  const float* xr = x + int64_t(blockIdx.x) * n;
  float* orow = out + int64_t(blockIdx.x) * n;
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += xr[j] * xr[j];
  __shared__ float part[32];
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o /= 2) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (threadIdx.x == 0) part[0] = t;
  }
  __syncthreads();
  const float var = part[0] / float(n);
  const float r = rsqrtf(var + eps);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    if (offset) {
      orow[j] = round_dt(xr[j] * r * (1.0f + w[j]), dt);
    } else {
      const float y = round_dt(xr[j] * r, dt);
      orow[j] = round_dt(w[j] * y, dt);
    }
  }
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
    const float lo = v[j], hi = v[j + half];
    const float a0 = round_dt(lo * c[j], dt), b0 = round_dt(-hi * s[j], dt);
    const float a1 = round_dt(hi * c[j + half], dt), b1 = round_dt(lo * s[j + half], dt);
    v[j] = round_dt(a0 + b0, dt);
    v[j + half] = round_dt(a1 + b1, dt);
  }
}

__global__ void add_round_k(const float* a, const float* b, int64_t n, Dt dt, float* out) {
  FOR_EACH(i, n) out[i] = round_dt(a[i] + b[i], dt);
}

// torch's CUDA silu: x / (1 + exp(-x)); gelu(approximate="tanh"): 0.5 x (1 + tanh(kBeta (x +
// kKappa x^3))) in fp32.
__global__ void act_mul_k(const float* g, const float* u, int64_t n, int act, Dt dt, float* out) {
  FOR_EACH(i, n) {
    const float x = g[i];
    float f;
    if (act == 0) {
      f = x / (1.0f + expf(-x));
    } else {
      // M_SQRT2 * M_2_SQRTPI * 0.5, as torch writes kBeta
      const float kBeta = float(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
      const float kKappa = 0.044715f;
      const float inner = kBeta * (x + kKappa * x * x * x);
      f = 0.5f * x * (1.0f + tanhf(inner));
    }
    out[i] = round_dt(round_dt(f, dt) * u[i], dt);
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
  int W = 1;
  while (W < T && W < 32) W *= 2;
  const bool active = lane < W;
  float m = -kInf;
  bool bad = false;
  float peak = 0.0f;
  for (int64_t j = lane; active && j < T; j += W) {
    const float raw = s[j];
    const bool hidden = masked_key(i, j, window);
    if (!hidden && isfinite(raw)) peak = fmaxf(peak, fabsf(raw));
    float x = round_dt(round_dt(raw, dt) * scaling, dt);
    if (cap > 0.0f) {
      x = round_dt(x / cap, dt);
      x = round_dt(tanhf(x), dt);
      x = round_dt(x * cap, dt);
    }
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
  for (int o = W / 2; o > 0; o /= 2) {
    const float b = __shfl_xor_sync(0xffffffffu, m, o);
    m = m < b ? b : m;
  }
  float sum = 0.0f;
  for (int64_t j = lane; active && j < T; j += W) sum += expf(s[j] - m);
  for (int o = W / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
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
// (window - 1) for a sliding-window layer (what transformers' cache keeps), else 0: one warp per
// query head. Raw scores s_j = q.k_j in fp32 (a sequential sum over d: not cuBLAS's order, which
// differs in the last bits before eager's rounding and in fused's fp32 scores), into S [heads,
// sstride]; then eager: the steps and softmax of eager_softmax_k (torch's lane layout for a row
// of L keys) and ctx = round(sum_j p_j v_j) in fp32, j ascending; or fused: the online softmax of
// fused_softmax_pv_k, blocks of 128 keys. No mask is needed: every key read is visible.
__global__ void decode_attention_k(const float* q, const void* kc, const void* vc, const float* vf,
                                   const int64_t* pos, int64_t heads, int64_t kv_heads, int64_t D,
                                   float scaling, float cap, int64_t window, int fused, Dt dt,
                                   float* S, int64_t sstride, float* ctx) {
  const int64_t h = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (h >= heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t P = pos[0], lo = window > 0 && P - (window - 1) > 0 ? P - (window - 1) : 0;
  const int64_t L = P + 1 - lo, kvh = h / (heads / kv_heads), kvd = kv_heads * D;
  const float* qh = q + h * D;
  float* s = S + h * sstride;
  for (int64_t j = lane; j < L; j += 32) {
    const int64_t row = (lo + j) * kvd + kvh * D;
    float acc = 0.0f;
    for (int64_t d = 0; d < D; ++d) acc += qh[d] * load_dt(kc, dt, row + d);
    s[j] = acc;
  }
  __syncwarp();
  const int nd = int((D + 31) / 32);
  float* o = ctx + h * D;
  if (!fused) {
    int W = 1;
    while (W < L && W < 32) W *= 2;
    const bool active = lane < W;
    float m = -kInf;
    for (int64_t j = lane; active && j < L; j += W) {
      float x = round_dt(round_dt(s[j], dt) * scaling, dt);
      if (cap > 0.0f) {
        x = round_dt(x / cap, dt);
        x = round_dt(tanhf(x), dt);
        x = round_dt(x * cap, dt);
      }
      s[j] = x;
      m = m > x ? m : x;
    }
    for (int o2 = W / 2; o2 > 0; o2 /= 2) {
      const float b = __shfl_xor_sync(0xffffffffu, m, o2);
      m = m < b ? b : m;
    }
    float sum = 0.0f;
    for (int64_t j = lane; active && j < L; j += W) sum += expf(s[j] - m);
    for (int o2 = W / 2; o2 > 0; o2 /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o2);
    __syncwarp();
    for (int64_t j = lane; active && j < L; j += W) s[j] = round_dt(expf(s[j] - m) / sum, dt);
    __syncwarp();
    for (int cd = 0; cd < nd; ++cd) {
      const int64_t d = lane + 32 * cd;
      if (d >= D) continue;
      float acc = 0.0f;
      for (int64_t j = 0; j < L; ++j) acc += s[j] * load_dt(vc, dt, (lo + j) * kvd + kvh * D + d);
      o[d] = round_dt(acc, dt);
    }
    return;
  }
  const float scale_log2 = scaling * float(1.44269504088896340736) /* log2(e) */;
  float acc[kMaxDPerLane];
  for (int c = 0; c < kMaxDPerLane; ++c) acc[c] = 0.0f;
  float m = -kInf, l = 0.0f;
  const int64_t i = L - 1;  // the query's column
  for (int64_t b0 = 0; b0 <= i; b0 += 32 * kKeysPerLane) {
    float sc[kKeysPerLane];
    float bmax = -kInf;
    for (int c = 0; c < kKeysPerLane; ++c) {
      const int64_t j = b0 + c * 32 + lane;
      sc[c] = j <= i ? s[j] : -kInf;
      bmax = fmaxf(bmax, sc[c]);
    }
    for (int o2 = 16; o2 > 0; o2 /= 2) bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, o2));
    const float mnew = fmaxf(m, bmax);
    const float ms = mnew == -kInf ? 0.0f : mnew * scale_log2;
    const float f = m == -kInf ? 0.0f : ex2_approx(m * scale_log2 - ms);
    l *= f;
    for (int c = 0; c < nd; ++c) acc[c] *= f;
    m = mnew;
    float pr[kKeysPerLane];
    for (int c = 0; c < kKeysPerLane; ++c) {
      const float e = ex2_approx(sc[c] * scale_log2 - ms);
      l += e;
      pr[c] = round_dt(e, dt);
    }
    for (int c = 0; c < kKeysPerLane; ++c)
      for (int src = 0; src < 32; ++src) {
        const float pj = __shfl_sync(0xffffffffu, pr[c], src);
        const int64_t j = b0 + c * 32 + src;
        if (j > i) continue;  // uniform across the warp
        const float* vj = vf + (lo + j) * kvd + kvh * D;
        for (int cd = 0; cd < nd; ++cd) {
          const int64_t d = lane + 32 * cd;
          if (d < D) acc[cd] += pj * vj[d];
        }
      }
  }
  for (int o2 = 16; o2 > 0; o2 /= 2) l += __shfl_xor_sync(0xffffffffu, l, o2);
  const float inv = 1.0f / l;
  for (int cd = 0; cd < nd; ++cd) {
    const int64_t d = lane + 32 * cd;
    if (d < D) o[d] = round_dt(acc[cd] * inv, dt);
  }
}

}  // namespace

void to_storage(const float* x, void* out, int64_t n, Dt dt) {
  to_storage_k<<<blocks_for(n, 256), 256, 0, g_stream>>>(x, out, n, dt);
  check_launch("to_storage");
}

void bias_round(const void* c_in, Dt ctype, const float* bias, int64_t rows, int64_t cols, Dt dt,
                float* out) {
  bias_round_k<<<blocks_for(rows * cols, 256), 256, 0, g_stream>>>(c_in, ctype, bias, rows, cols,
                                                                   dt, out);
  check_launch("bias_round");
}

void rmsnorm(const float* x, int64_t rows, int64_t n, const float* w, float eps, bool offset, Dt dt,
             float* out) {
  if (rows == 0) return;
  rmsnorm_k<<<unsigned(rows), n <= 128 ? 32 : 256, 0, g_stream>>>(x, n, w, eps, offset, dt, out);
  check_launch("rmsnorm");
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

void act_mul(const float* g, const float* u, int64_t n, int act, Dt dt, float* out) {
  act_mul_k<<<blocks_for(n, 256), 256, 0, g_stream>>>(g, u, n, act, dt, out);
  check_launch("act_mul");
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
                      float* ctx) {
  if (D > 32 * kMaxDPerLane) throw std::runtime_error("decode attention: head_dim above 256");
  decode_attention_k<<<blocks_for(heads * 32, 128), 128, 0, g_stream>>>(
      q, kc, vc, vf, pos, heads, kv_heads, D, scaling, cap, window, fused ? 1 : 0, dt, S, sstride,
      ctx);
  check_launch("decode_attention");
}

}  // namespace nanscope::cuda
