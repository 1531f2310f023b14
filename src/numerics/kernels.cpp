// Kernels of the forward pass. Elementwise expressions here must round exactly where torch
// rounds, so contraction of a*b+c into one FMA is switched off for this file (the matmul
// microkernel uses FMA intrinsics on purpose: fp32 accumulation order is free, rounding of the
// output is not).
#pragma GCC optimize("fp-contract=off")

#include "numerics/kernels.hpp"

#include <cblas.h>
#include <immintrin.h>
#include <sleef.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include "numerics/activations.hpp"
#include "numerics/backend.hpp"
#include "numerics/dtype_simd.hpp"
#include "numerics/gemm_amx.hpp"
#include "numerics/gemm_bf16.hpp"
#include "numerics/parallel.hpp"
#include "numerics/profile.hpp"

namespace nanscope {

namespace {

// ---- weights as the run dtype sees them ----------------------------------------------------

// Scalar: the stored value, rounded to dt when the storage dtype differs (the cast at load).
inline float cast_weight(float stored, DType storage, DType dt) {
  if (storage == dt || dt == DType::F32) return stored;
  return round_to(stored, dt);
}

// Eight consecutive stored values as fp32 (the lanes of dtype_simd.hpp).
inline __m256 load8_stored(const std::byte* p, DType storage) {
  switch (storage) {
    case DType::BF16:
      return simd::load_bf16x8(p);
    case DType::F16:
      return simd::load_f16x8(p);
    default:
      return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

// Eight fp32 values rounded to dt (F32: unchanged), lane for lane as round_to.
inline __m256 round8(__m256 v, DType dt) {
  if (dt == DType::BF16) return simd::round_bf16x8(v);
  if (dt == DType::F16) return simd::round_f16x8(v);
  return v;
}

inline __m256 load8_weight(const std::byte* p, DType storage, DType dt) {
  __m256 v = load8_stored(p, storage);
  if (storage == dt || dt == DType::F32) return v;
  return round8(v, dt);
}

inline std::byte* as_bytes(uint16_t* p) {
  return reinterpret_cast<std::byte*>(p);
}
inline const std::byte* as_bytes(const uint16_t* p) {
  return reinterpret_cast<const std::byte*>(p);
}

inline size_t elem_size(DType t) {
  return t == DType::F32 ? 4 : 2;
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// ---- x @ W^T microkernel: RB weight rows x TB tokens, fp32 tile of converted weights -------
template <int RB, int TB>
inline void micro(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t K,
                  float (&out)[RB][TB]) {
  __m256 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = _mm256_loadu_ps(w + r * ldw + k);
    for (int t = 0; t < TB; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t k = K8; k < K; ++k) s += w[r * ldw + k] * x[t * ldx + k];
      out[r][t] = s;
    }
}

template <int RB>
inline void micro_rows(const float* w, int64_t ldw, const float* x, int64_t T, int64_t K,
                       int64_t row0, const float* bias, DType dt, float* out, int64_t ldo) {
  int64_t t = 0;
  auto emit = [&](auto& res, int tb) {
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < tb; ++j) {
        float v = res[r][j];
        if (bias) v += bias[row0 + r];
        out[(t + j) * ldo + row0 + r] = round_to(v, dt);
      }
  };
  for (; t + 2 <= T; t += 2) {
    float res[RB][2];
    micro<RB, 2>(w, ldw, x + t * K, K, K, res);
    emit(res, 2);
  }
  if (t < T) {
    float res[RB][1];
    micro<RB, 1>(w, ldw, x + t * K, K, K, res);
    emit(res, 1);
  }
}

// OpenBLAS runs inside our own worker threads: its own threads would oversubscribe the cores.
void blas_single_threaded() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

constexpr int64_t kTileRows = 8;   // weight rows converted at a time by the streaming kernel
constexpr int64_t kGemmRows = 64;  // weight rows widened at a time for sgemm

}  // namespace

float weight_at(const WeightView& w, int64_t r, int64_t c, DType dt) {
  return cast_weight(load_as_f32(w.data, w.storage, size_t(r * w.cols + c)), w.storage, dt);
}

void weight_rows(const WeightView& w, int64_t row, int64_t n, DType dt, float* out) {
  const size_t es = elem_size(w.storage);
  const int64_t total = n * w.cols;
  const std::byte* p = w.data + size_t(row * w.cols) * es;
  int64_t i = 0;
  for (; i + 8 <= total; i += 8) _mm256_storeu_ps(out + i, load8_weight(p + i * es, w.storage, dt));
  for (; i < total; ++i) out[i] = cast_weight(load_as_f32(p, w.storage, size_t(i)), w.storage, dt);
}

void weight_vector(const std::byte* data, DType storage, int64_t n, DType dt, float* out) {
  weight_rows(WeightView{data, storage, 1, n}, 0, 1, dt, out);
}

// ---- linear layers: one function per path of backend.hpp, chosen by choose_linear_path --------
namespace {

using U16Buffer = std::vector<uint16_t, ActivationAllocator<uint16_t>>;

// The weights as bf16 bit patterns for the bf16 products: weights stored in bf16 as mapped,
// others cast to bf16 first into wb (the cast at load).
const uint16_t* bf16_weights(const WeightView& w, DType dt, U16Buffer& wb) {
  if (w.storage == DType::BF16) return reinterpret_cast<const uint16_t*>(w.data);
  const int64_t K = w.cols, N = w.rows;
  wb.resize(static_cast<size_t>(N * K));
  parallel_for(N, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> rows(static_cast<size_t>((r1 - r0) * K));
    weight_rows(w, r0, r1 - r0, dt, rows.data());
    store_from_f32(rows.data(), DType::BF16, as_bytes(wb.data() + r0 * K), rows.size());
  });
  return wb.data();
}

// Our AMX kernel (bf16 runs): fp32 activations in, bias and rounding inside, fp32 out.
void linear_amx(const float* x, int64_t T, const WeightView& w, const float* bias, DType dt,
                float* out) {
  U16Buffer wb;
  gemm_amx::linear(x, T, w.cols, bf16_weights(w, dt, wb), w.rows, bias, out);
}

// oneDNN (bf16 runs): products of bf16 values accumulated in fp32 (AVX512-BF16 / AMX), as
// torch's bf16 linear.
void linear_onednn(const float* x, int64_t T, const WeightView& w, const float* bias, DType dt,
                   float* out) {
  const int64_t K = w.cols, N = w.rows;
  U16Buffer wb;
  const uint16_t* wp = bf16_weights(w, dt, wb);
  // The activations already hold bf16 values, so narrowing them is exact.
  std::optional<profile::Scope> step(std::in_place, "linear.to_bf16");
  // Uninitialised and reused between calls (numerics/activations.hpp): a zero-filled fresh
  // array here cost 1.4 s of 8.6 s for 2048 tokens of the 4B shape on the Xeon.
  U16Buffer xb(static_cast<size_t>(T * K));
  parallel_for(T * K, 1 << 16, [&](int64_t lo, int64_t hi) {
    store_from_f32(x + lo, DType::BF16, as_bytes(xb.data() + lo), size_t(hi - lo));
  });
  // oneDNN adds the bias and rounds to bf16 itself (round(acc + bias), one rounding, as
  // the other paths); the bf16 result is widened back into the fp32 activations.
  U16Buffer ob(static_cast<size_t>(T * N));
  step.emplace("linear.onednn");
  gemm_bf16::matmul_bf16_out(xb.data(), T, K, wp, N, bias, ob.data());
  step.emplace("linear.widen");
  parallel_for(T * N, 1 << 16, [&](int64_t lo, int64_t hi) {
    load_to_f32(as_bytes(ob.data() + lo), DType::BF16, out + lo, size_t(hi - lo));
  });
}

// Many tokens: compute-bound. Convert a block of rows to fp32 once, then OpenBLAS sgemm
// (single-threaded inside each of our threads), then bias and one rounding.
void linear_blas(const float* x, int64_t T, const WeightView& w, const float* bias, DType dt,
                 float* out) {
  const int64_t K = w.cols, N = w.rows;
  blas_single_threaded();
  parallel_for(N, kGemmRows, [&](int64_t r0, int64_t r1) {
    std::vector<float> tile(static_cast<size_t>(kGemmRows * K)), acc(size_t(T * kGemmRows));
    for (int64_t rt = r0; rt < r1; rt += kGemmRows) {
      const int64_t nr = std::min(kGemmRows, r1 - rt);
      weight_rows(w, rt, nr, dt, tile.data());
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(nr), int(K), 1.0f, x, int(K),
                  tile.data(), int(K), 0.0f, acc.data(), int(nr));
      for (int64_t t = 0; t < T; ++t) {
        const float* a = acc.data() + t * nr;
        float* o = out + t * N + rt;
        int64_t r = 0;
        for (; r + 8 <= nr; r += 8) {
          __m256 v = _mm256_loadu_ps(a + r);
          if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + rt + r));
          _mm256_storeu_ps(o + r, round8(v, dt));
        }
        for (; r < nr; ++r) o[r] = round_to(bias ? a[r] + bias[rt + r] : a[r], dt);
      }
    }
  });
}

// One or two tokens (a decode step): every weight is used once per token, so it is converted in
// registers as it streams in, never written to a tile. The lanes and the order of the sums are
// those of micro(): the same bits as the tile path.
template <int RB, int TB>
inline void micro_direct(const std::byte* w, size_t row_bytes, DType storage, DType dt,
                         const float* x, int64_t ldx, int64_t K, float (&out)[RB][TB]) {
  const size_t es = elem_size(storage);
  __m256 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[RB];
    for (int r = 0; r < RB; ++r)
      wv[r] = load8_weight(w + r * row_bytes + size_t(k) * es, storage, dt);
    for (int t = 0; t < TB; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) {
      float s = hsum(acc[r][t]);
      for (int64_t k = K8; k < K; ++k)
        s += cast_weight(load_as_f32(w + r * row_bytes, storage, size_t(k)), storage, dt) *
             x[t * ldx + k];
      out[r][t] = s;
    }
}

template <int RB, int TB>
inline void direct_rows(const WeightView& w, int64_t row0, const float* x, const float* bias,
                        DType dt, float* out) {
  const size_t row_bytes = size_t(w.cols) * elem_size(w.storage);
  float res[RB][TB];
  micro_direct<RB, TB>(w.data + size_t(row0) * row_bytes, row_bytes, w.storage, dt, x, w.cols,
                       w.cols, res);
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) {
      float v = res[r][t];
      if (bias) v += bias[row0 + r];
      out[t * w.rows + row0 + r] = round_to(v, dt);
    }
}

template <int TB>
void linear_direct(const float* x, const WeightView& w, const float* bias, DType dt, float* out) {
  parallel_for(w.rows, kTileRows, [&](int64_t r0, int64_t r1) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) direct_rows<4, TB>(w, r, x, bias, dt, out);
    for (; r < r1; ++r) direct_rows<1, TB>(w, r, x, bias, dt, out);
  });
}

// Few tokens: memory-bound, the weights are streamed once through an AVX2 microkernel.
void linear_stream(const float* x, int64_t T, const WeightView& w, const float* bias, DType dt,
                   float* out) {
  if (T == 1) return linear_direct<1>(x, w, bias, dt, out);
  if (T == 2) return linear_direct<2>(x, w, bias, dt, out);
  const int64_t K = w.cols, N = w.rows;
  parallel_for(N, kTileRows, [&](int64_t r0, int64_t r1) {
    std::vector<float> tile(static_cast<size_t>(kTileRows * K));
    for (int64_t rt = r0; rt < r1; rt += kTileRows) {
      const int64_t nr = std::min(kTileRows, r1 - rt);
      weight_rows(w, rt, nr, dt, tile.data());
      int64_t r = 0;
      for (; r + 4 <= nr; r += 4)
        micro_rows<4>(tile.data() + r * K, K, x, T, K, rt + r, bias, dt, out, N);
      for (; r < nr; ++r) micro_rows<1>(tile.data() + r * K, K, x, T, K, rt + r, bias, dt, out, N);
    }
  });
}

// Few tokens on AVX-512 (Stream512): 16 lanes, the weights converted in registers as they
// stream in, RB rows at a time and every token of the block while those rows sit in L1, so the
// weights are read from memory once for up to 15 tokens. Only where the stored values are the
// run dtype's (or the run is fp32): a cast at load (bf16 stored, fp16 run) takes Stream.
// The zero-masked forms of the intrinsics below: GCC 12's plain forms start from an undefined
// register (`__Y = __Y`), which -Werror=uninitialized rejects once inlined here.
#define NS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2")))

NS_AVX512 inline __m512 bf16x16_to_f32(__m256i b) {
  return _mm512_castsi512_ps(
      _mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, b), 16));
}

// Once per output: through memory, as the cast and extract intrinsics start from undefined ones.
NS_AVX512 inline float hsum16(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  return hsum(_mm256_add_ps(_mm256_load_ps(t), _mm256_load_ps(t + 8)));
}

template <DType S>
NS_AVX512 inline __m512 load16_stored(const std::byte* p) {
  if constexpr (S == DType::BF16)
    return bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else if constexpr (S == DType::F16)
    return _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
}

// The last K % 16 values, the lanes past K read as zero.
template <DType S>
NS_AVX512 inline __m512 load16_stored_tail(const std::byte* p, int n) {
  const __mmask16 m = __mmask16((1u << n) - 1);
  if constexpr (S == DType::BF16)
    return bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, p));
  else if constexpr (S == DType::F16)
    return _mm512_maskz_cvtph_ps(0xFFFF, _mm256_maskz_loadu_epi16(m, p));
  else
    return _mm512_maskz_loadu_ps(m, p);
}

// The input x: fp32, or (XH) the same values held as bf16 (a bf16 run's inputs are bf16 already).
template <bool XH>
NS_AVX512 inline __m512 load16_x(const void* x, int64_t i) {
  if constexpr (XH)
    return bf16x16_to_f32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i)));
  else
    return _mm512_loadu_ps(static_cast<const float*>(x) + i);
}

template <bool XH>
NS_AVX512 inline __m512 load16_x_tail(const void* x, int64_t i, __mmask16 m) {
  if constexpr (XH)
    return bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i));
  else
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
}

template <DType S, int RB, int TB, bool XH>
NS_AVX512 inline void micro512(const std::byte* w, size_t row_bytes, const void* x, int64_t K,
                               int64_t prefetch, float (&out)[RB][TB]) {
  constexpr size_t es = S == DType::F32 ? 4 : 2;
  __m512 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 wv[RB];
    for (int r = 0; r < RB; ++r) {
      const std::byte* p = w + r * row_bytes + size_t(k) * es;
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(p + prefetch), _MM_HINT_T0);
      wv[r] = load16_stored<S>(p);
    }
    for (int t = 0; t < TB; ++t) {
      const __m512 xv = load16_x<XH>(x, t * K + k);
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  if (K16 < K) {
    const int n = int(K - K16);
    const __mmask16 m = __mmask16((1u << n) - 1);
    for (int r = 0; r < RB; ++r) {
      const __m512 wv = load16_stored_tail<S>(w + r * row_bytes + size_t(K16) * es, n);
      for (int t = 0; t < TB; ++t)
        acc[r][t] = _mm512_fmadd_ps(wv, load16_x_tail<XH>(x, t * K + K16, m), acc[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) out[r][t] = hsum16(acc[r][t]);
}

// Rows [r0, r1) of one product for every token: blocks of RB rows, tokens in groups of 4, 2, 1.
template <DType S, int RB, bool XH>
NS_AVX512 void rows512(const void* x, int64_t T, const WeightView& w, const float* bias, DType dt,
                       float* out, int64_t r0, int64_t r1, int64_t prefetch) {
  const size_t row_bytes = size_t(w.cols) * (S == DType::F32 ? 4 : 2);
  const size_t xes = XH ? 2 : 4;
  const auto* xb = static_cast<const std::byte*>(x);
  auto block = [&](auto rb, int64_t r) {
    constexpr int R = decltype(rb)::value;
    const std::byte* wr = w.data + size_t(r) * row_bytes;
    auto emit = [&](auto& res, int64_t t0, int tb) {
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < tb; ++j) {
          float v = res[i][j];
          if (bias) v += bias[r + i];
          out[(t0 + j) * w.rows + r + i] = round_to(v, dt);
        }
    };
    auto xt = [&](int64_t t) { return xb + size_t(t * w.cols) * xes; };
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {
      float res[R][4];
      micro512<S, R, 4, XH>(wr, row_bytes, xt(t), w.cols, prefetch, res);
      emit(res, t, 4);
    }
    if (t + 2 <= T) {
      float res[R][2];
      micro512<S, R, 2, XH>(wr, row_bytes, xt(t), w.cols, prefetch, res);
      emit(res, t, 2);
      t += 2;
    }
    if (t < T) {
      float res[R][1];
      micro512<S, R, 1, XH>(wr, row_bytes, xt(t), w.cols, prefetch, res);
      emit(res, t, 1);
    }
  };
  int64_t r = r0;
  for (; r + RB <= r1; r += RB) block(std::integral_constant<int, RB>{}, r);
  for (; r < r1; ++r) block(std::integral_constant<int, 1>{}, r);
}

bool stream512_computes(const WeightView& w, DType dt) {
  return w.storage == dt || dt == DType::F32;
}

// Rows [r0, r1) of w on the AVX-512 kernel with the rows per block of the tuning; x16 (nullable):
// the input's values as bf16.
void stream512_rows(const float* x, const uint16_t* x16, int64_t T, const WeightView& w,
                    const float* bias, DType dt, float* out, int64_t r0, int64_t r1) {
  const DecodeTuning& d = backend().decode;
  const int64_t pf = d.prefetch;
  auto go = [&](auto s, auto xh) {
    constexpr DType S = decltype(s)::value;
    constexpr bool XH = decltype(xh)::value;
    const void* xp = XH ? static_cast<const void*>(x16) : static_cast<const void*>(x);
    if (d.rows >= 8) return rows512<S, 8, XH>(xp, T, w, bias, dt, out, r0, r1, pf);
    if (d.rows >= 4) return rows512<S, 4, XH>(xp, T, w, bias, dt, out, r0, r1, pf);
    if (d.rows >= 2) return rows512<S, 2, XH>(xp, T, w, bias, dt, out, r0, r1, pf);
    return rows512<S, 1, XH>(xp, T, w, bias, dt, out, r0, r1, pf);
  };
  auto on = [&](auto s) {
    if (x16) return go(s, std::true_type{});
    return go(s, std::false_type{});
  };
  switch (w.storage) {
    case DType::BF16:
      return on(std::integral_constant<DType, DType::BF16>{});
    case DType::F16:
      return on(std::integral_constant<DType, DType::F16>{});
    default:
      return on(std::integral_constant<DType, DType::F32>{});
  }
}

// x [n] as bf16 when every value is one (a bf16 run's inputs), else empty.
std::vector<uint16_t> exact_bf16(const float* x, int64_t n) {
  std::vector<uint16_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = std::bit_cast<uint32_t>(x[i]);
    if ((b & 0xFFFFu) != 0) return {};
    v[size_t(i)] = uint16_t(b >> 16);
  }
  return v;
}

// Several products of one input on one parallel loop over all their rows (q/k/v, gate/up of a
// decode step): one fork and join instead of one per product, and no worker idles on the small
// ones. The rows go in blocks of kStreamBlock with work stealing: on the GPU machine's 16 vCPUs a
// static split waited for the slowest core at every product (median step 10-20% above the best).
// Each output row is still computed whole by one worker, so the split never changes a value.
constexpr int64_t kStreamBlock = 16;  // rows: 80 KB of a 2560-wide bf16 weight

void stream512_many(const float* x, int64_t T, std::span<const LinearOutput> outs, DType dt) {
  std::vector<uint16_t> x16;
  if (backend().decode.x16 && dt == DType::BF16 && !outs.empty())
    x16 = exact_bf16(x, T * outs[0].w.cols);
  const uint16_t* xh = x16.empty() ? nullptr : x16.data();
  std::vector<int64_t> first{0};  // the first block of each output
  for (const LinearOutput& o : outs)
    first.push_back(first.back() + (o.w.rows + kStreamBlock - 1) / kStreamBlock);
  parallel_for_stealing(first.back(), [&](int64_t, int64_t item) {
    const size_t i = size_t(std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1);
    const LinearOutput& o = outs[i];
    const int64_t r0 = (item - first[i]) * kStreamBlock;
    stream512_rows(x, xh, T, o.w, o.bias, dt, o.out, r0, std::min(o.w.rows, r0 + kStreamBlock));
  });
}

void linear_stream512(const float* x, int64_t T, const WeightView& w, const float* bias, DType dt,
                      float* out) {
  if (!stream512_computes(w, dt)) return linear_stream(x, T, w, bias, dt, out);
  const LinearOutput o{w, bias, out};
  stream512_many(x, T, std::span(&o, 1), dt);
}

}  // namespace

void linear(const float* x, int64_t T, const WeightView& w, const float* bias, DType dt,
            float* out) {
  switch (choose_linear_path(dt, T)) {
    case MatmulPath::Scalar:
      return linear_ref(x, T, w, bias, dt, out);
    case MatmulPath::Stream:
      return linear_stream(x, T, w, bias, dt, out);
    case MatmulPath::Stream512:
      return linear_stream512(x, T, w, bias, dt, out);
    case MatmulPath::Blas:
      return linear_blas(x, T, w, bias, dt, out);
    case MatmulPath::OneDnn:
      return linear_onednn(x, T, w, bias, dt, out);
    case MatmulPath::AmxTiles:
    case MatmulPath::AmxEmulated:
      return linear_amx(x, T, w, bias, dt, out);
  }
}

void linear_shared_input(const float* x, int64_t T, std::span<const LinearOutput> outs, DType dt) {
  // On the AMX path the input is narrowed and packed once for all outputs of bf16 weights of one
  // width; every other case is one linear() per output.
  const MatmulPath path = choose_linear_path(dt, T);
  if (path == MatmulPath::Stream512 &&
      std::all_of(outs.begin(), outs.end(),
                  [&](const LinearOutput& o) { return stream512_computes(o.w, dt); }))
    return stream512_many(x, T, outs, dt);
  bool shared = is_amx(path) && !outs.empty();
  for (const LinearOutput& o : outs)
    shared = shared && o.w.storage == DType::BF16 && o.w.cols == outs[0].w.cols;
  if (!shared) {
    for (const LinearOutput& o : outs) linear(x, T, o.w, o.bias, dt, o.out);
    return;
  }
  std::vector<gemm_amx::LinearJob> jobs;
  for (const LinearOutput& o : outs)
    jobs.push_back({reinterpret_cast<const uint16_t*>(o.w.data), o.w.rows, o.bias, o.out});
  gemm_amx::linear_many(x, T, outs[0].w.cols, jobs);
}

void linear_ref(const float* x, int64_t T, const WeightView& w, const float* bias, DType dt,
                float* out) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < w.rows; ++r) {
      float s = 0.0f;
      for (int64_t k = 0; k < w.cols; ++k) s += x[t * w.cols + k] * weight_at(w, r, k, dt);
      if (bias) s += bias[r];
      out[t * w.rows + r] = round_to(s, dt);
    }
}

// ---- RMSNorm ---------------------------------------------------------------------------------
namespace {
inline void rmsnorm_finish(const float* x, int64_t n, float var, const float* weight, double eps,
                           DType dt, float* out, bool offset) {
  // torch: variance + eps (eps as float), rsqrt (computed as 1/sqrt), multiply, cast, * weight.
  const float r = 1.0f / std::sqrt(var + float(eps));
  if (offset) {  // Gemma: (x * r) * (1 + w) in fp32, one rounding
    for (int64_t i = 0; i < n; ++i) out[i] = round_to((x[i] * r) * (1.0f + weight[i]), dt);
    return;
  }
  int64_t i = 0;
  const __m256 rv = _mm256_set1_ps(r);
  for (; i + 8 <= n; i += 8) {
    const __m256 y = round8(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), dt);
    _mm256_storeu_ps(out + i, round8(_mm256_mul_ps(_mm256_loadu_ps(weight + i), y), dt));
  }
  for (; i < n; ++i) {
    const float y = round_to(x[i] * r, dt);
    out[i] = round_to(weight[i] * y, dt);
  }
}
}  // namespace

void rmsnorm(const float* x, int64_t rows, int64_t n, const float* weight, double eps, DType dt,
             float* out, bool offset) {
  parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)),
               [&](int64_t r0, int64_t r1) {
                 for (int64_t row = r0; row < r1; ++row) {
                   const float* xr = x + row * n;
                   __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
                   int64_t i = 0;
                   for (; i + 16 <= n; i += 16) {
                     const __m256 a = _mm256_loadu_ps(xr + i), b = _mm256_loadu_ps(xr + i + 8);
                     acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(a, a));
                     acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(b, b));
                   }
                   float s = hsum(_mm256_add_ps(acc0, acc1));
                   for (; i < n; ++i) s += xr[i] * xr[i];
                   rmsnorm_finish(xr, n, s / float(n), weight, eps, dt, out + row * n, offset);
                 }
               });
}

void rmsnorm_ref(const float* x, int64_t rows, int64_t n, const float* weight, double eps, DType dt,
                 float* out, bool offset) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * n;
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += xr[i] * xr[i];
    rmsnorm_finish(xr, n, s / float(n), weight, eps, dt, out + row * n, offset);
  }
}

// ---- softmax (fp32) --------------------------------------------------------------------------
namespace {
// SLEEF's expf_u10 (torch's Vectorized<float>::exp) for one value.
inline float sleef_expf(float x) {
  return _mm256_cvtss_f32(Sleef_expf8_u10avx2(_mm256_set1_ps(x)));
}

// torch's max reduction propagates NaN.
inline float nan_max(float a, float b) {
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a > b ? a : b;
}
}  // namespace

// torch's _vec_softmax_lastdim for float (the softmax of eager attention, run in fp32), with the
// 16 float lanes of the AVX-512 build the goldens were made with: the max and the sum are
// vec::reduce_all (lane-wise over whole vectors, the remainder into the first lanes, then halves,
// quarters, pairs, neighbours; fewer than 16 values in order), exp(x - max) is SLEEF's expf_u10 on
// every element (vec::map sends the remainder through a partial vector too), then x * (1 / sum).
namespace {
constexpr int64_t kTorchLanes = kTorchFloatLanes;

// The tree of vec_reduce_all over acc's lanes.
template <typename Op>
float torch_lanes_reduce(float (&acc)[kTorchLanes], Op op) {
  for (int64_t w = kTorchLanes / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] = op(acc[l], acc[l + w]);
  return acc[0];
}

template <typename Op>
float torch_reduce_all(const float* d, int64_t n, Op op) {
  float acc[kTorchLanes];
  if (n < kTorchLanes) {
    float a = d[0];
    for (int64_t i = 1; i < n; ++i) a = op(a, d[i]);
    return a;
  }
  std::memcpy(acc, d, sizeof acc);
  int64_t k = kTorchLanes;
  for (; k < n - n % kTorchLanes; k += kTorchLanes)
    for (int64_t l = 0; l < kTorchLanes; ++l) acc[l] = op(acc[l], d[k + l]);
  for (int64_t l = 0; k + l < n; ++l) acc[l] = op(acc[l], d[k + l]);
  return torch_lanes_reduce(acc, op);
}

float add(float a, float b) {
  return a + b;
}
}  // namespace

float torch_lanes_sum(float (&lanes)[kTorchFloatLanes]) {
  return torch_lanes_reduce(lanes, add);
}

void softmax_row(const float* x, int64_t n, float* out) {
  const float m = torch_reduce_all(x, n, nan_max);
  const __m256 mv = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
  for (; i < n; ++i) out[i] = sleef_expf(x[i] - m);
  const float inv = 1.0f / torch_reduce_all(out, n, add);
  const __m256 iv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(out + i), iv));
  for (; i < n; ++i) out[i] = out[i] * inv;
}

void attention_scores_row(float* s, int64_t T, int64_t i, float scaling, float mask, DType dt,
                          double& peak) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 sc = _mm256_set1_ps(scaling), mk = _mm256_set1_ps(mask);
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 last = _mm256_set1_ps(float(i));
  __m256 pk = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= T; j += 8) {
    __m256 v = _mm256_loadu_ps(s + j);
    const __m256 col = _mm256_add_ps(lane, _mm256_set1_ps(float(j)));  // exact below 2^24
    const __m256 masked = _mm256_cmp_ps(col, last, _CMP_GT_OQ);
    const __m256 a = _mm256_and_ps(v, abs_mask);
    const __m256 counts = _mm256_andnot_ps(masked, _mm256_cmp_ps(a, inf, _CMP_LT_OQ));
    pk = _mm256_max_ps(pk, _mm256_and_ps(a, counts));
    v = round8(_mm256_mul_ps(round8(v, dt), sc), dt);
    if (_mm256_movemask_ps(masked)) {
      const __m256 added = round8(_mm256_add_ps(v, mk), dt);
      v = _mm256_blendv_ps(v, added, masked);
    }
    _mm256_storeu_ps(s + j, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, pk);
  for (float p : lanes) peak = std::max(peak, double(p));
  for (; j < T; ++j) {
    if (j <= i && std::isfinite(s[j])) peak = std::max(peak, double(std::fabs(s[j])));
    float v = round_to(round_to(s[j], dt) * scaling, dt);
    if (j > i) v = round_to(v + mask, dt);
    s[j] = v;
  }
}

void attention_scores_row_ref(float* s, int64_t T, int64_t i, float scaling, float mask, DType dt,
                              double& peak) {
  for (int64_t j = 0; j <= i && j < T; ++j)
    if (std::isfinite(s[j])) peak = std::max(peak, double(std::fabs(s[j])));
  for (int64_t j = 0; j < T; ++j) s[j] = round_to(s[j], dt);
  for (int64_t j = 0; j < T; ++j) s[j] = round_to(s[j] * scaling, dt);
  for (int64_t j = i + 1; j < T; ++j) s[j] = round_to(s[j] + mask, dt);
}

void softmax_row_ref(const float* x, int64_t n, float* out) {
  bool any_nan = false;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i]))
      any_nan = true;
    else if (x[i] > m)
      m = x[i];
  }
  if (any_nan) m = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> e(static_cast<size_t>(n));
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += (e[size_t(i)] = std::exp(x[i] - m));
  for (int64_t i = 0; i < n; ++i) out[i] = e[size_t(i)] * (1.0f / sum);
}

// ---- SiLU(gate) * up -------------------------------------------------------------------------
// torch's CPU silu (aten/src/ATen/native/cpu/Activation.cpp) is x / (1 + exp(-x)) on whole
// vectors with Vectorized<float>::exp(), which is SLEEF's expf_u10, and the C library's expf on
// the elements left over. Here too: SLEEF (Debian's libsleef) for every 8 lanes, whose AVX2 and
// AVX-512 builds compute the same function, and std::exp for the remainder of the array (the
// chunks of parallel_for are multiples of 8, so which elements are left over does not depend on
// the thread count). Eight lanes of SLEEF also cost a tenth of eight calls of expf.
namespace {
// round(round(silu(g)) * u) for 8 lanes with SLEEF's exp, and for one element given exp(-g) (the
// caller picks SLEEF or std::exp as torch would): silu_mul and linear_silu_mul's epilogue.
inline __m256 silu_mul8(__m256 g, __m256 u, DType dt) {
  const __m256 ex = Sleef_expf8_u10avx2(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)));  // exp(-g)
  const __m256 sv = round8(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), ex)), dt);
  return round8(_mm256_mul_ps(sv, u), dt);
}
inline float silu_mul1(float g, float u, float exp_minus_g, DType dt) {
  return round_to(round_to(g / (1.0f + exp_minus_g), dt) * u, dt);
}
}  // namespace

void silu_mul(const float* gate, const float* up, int64_t n, DType dt, float* out) {
  parallel_for(n, 4096, [&](int64_t b, int64_t e) {
    int64_t i = b;
    for (; i + 8 <= e; i += 8)
      _mm256_storeu_ps(out + i, silu_mul8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i), dt));
    for (; i < e; ++i) out[i] = silu_mul1(gate[i], up[i], std::exp(-gate[i]), dt);
  });
}

void linear_silu_mul(const float* x, int64_t T, const LinearOutput& gate, const LinearOutput& up,
                     DType dt, float* act) {
  const bool pair = is_amx(choose_linear_path(dt, T)) && gate.w.storage == DType::BF16 &&
                    up.w.storage == DType::BF16 && gate.w.rows == up.w.rows &&
                    gate.w.cols == up.w.cols;
  if (!pair) {
    std::vector<float, ActivationAllocator<float>> g(size_t(T * gate.w.rows)), u(g.size());
    const LinearOutput outs[2] = {{gate.w, gate.bias, g.data()}, {up.w, up.bias, u.data()}};
    linear_shared_input(x, T, outs, dt);
    silu_mul(g.data(), u.data(), int64_t(g.size()), dt, act);
    return;
  }
  const int64_t N = gate.w.rows;
  const int64_t vec_end = T * N / 8 * 8;  // silu_mul's vector elements (flat index)
  const float *bg = gate.bias, *bu = up.bias;
  gemm_amx::linear_pair(x, T, gate.w.cols, reinterpret_cast<const uint16_t*>(gate.w.data),
                        reinterpret_cast<const uint16_t*>(up.w.data), N,
                        [&](const float* cg, const float* cu, int64_t ldc, int64_t m0, int64_t m1,
                            int64_t n0, int64_t n1) {
                          for (int64_t m = m0; m < m1; ++m) {
                            const float* gr = cg + (m - m0) * ldc - n0;  // gr[n]: column n of row m
                            const float* ur = cu + (m - m0) * ldc - n0;
                            float* o = act + m * N;
                            int64_t n = n0;
                            for (; n + 8 <= n1 && m * N + n + 8 <= vec_end; n += 8) {
                              __m256 g = _mm256_loadu_ps(gr + n), u = _mm256_loadu_ps(ur + n);
                              if (bg) g = _mm256_add_ps(g, _mm256_loadu_ps(bg + n));
                              if (bu) u = _mm256_add_ps(u, _mm256_loadu_ps(bu + n));
                              _mm256_storeu_ps(o + n, silu_mul8(round8(g, dt), round8(u, dt), dt));
                            }
                            for (; n < n1; ++n) {
                              const float g = round_to(bg ? gr[n] + bg[n] : gr[n], dt);
                              const float u = round_to(bu ? ur[n] + bu[n] : ur[n], dt);
                              o[n] = silu_mul1(
                                  g, u, m * N + n < vec_end ? sleef_expf(-g) : std::exp(-g), dt);
                            }
                          }
                        });
}

void silu_mul_ref(const float* gate, const float* up, int64_t n, DType dt, float* out) {
  const int64_t vec_end = n / 8 * 8;  // elements torch computes in vectors
  for (int64_t i = 0; i < n; ++i) {
    const float ex = i < vec_end ? sleef_expf(-gate[i]) : std::exp(-gate[i]);
    const float s = round_to(gate[i] / (1.0f + ex), dt);
    out[i] = round_to(s * up[i], dt);
  }
}

void add_round(const float* a, const float* b, int64_t n, DType dt, float* out) {
  parallel_for(n, 1 << 16, [&](int64_t lo, int64_t hi) {
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8)
      _mm256_storeu_ps(out + i,
                       round8(_mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)), dt));
    for (; i < hi; ++i) out[i] = round_to(a[i] + b[i], dt);
  });
}

float torch_exp_u20(float x) {
  const float log2e = std::bit_cast<float>(0x3fb8aa3bu);
  const float ln2 = std::bit_cast<float>(0x3f317218u);
  const float ln_flt_min = std::bit_cast<float>(0xc2aeac50u);
  const float ln_flt_max = std::bit_cast<float>(0x42b17218u);
  const bool below = x < ln_flt_min;
  // _mm512_min_ps / max_ps return the second operand when either is NaN.
  float src = x < ln_flt_max ? x : ln_flt_max;
  src = src > ln_flt_min ? src : ln_flt_min;
  const float fx = std::floor(std::fma(src, log2e, 0.5f));
  const float r = std::fma(-fx, ln2, src);
  float p = std::fma(r, 0.00828929059f, 0.0418978221f);
  p = std::fma(r, p, 0.166676521f);
  p = std::fma(r, p, 0.499991506f);
  p = std::fma(r, p, 0.999999701f);
  p = std::fma(r, p, 1.0f);
  const int32_t e = int32_t(std::nearbyint(fx - 1.0f));
  const float two_n = below ? 0.0f : std::bit_cast<float>(uint32_t(e + 127) << 23);
  return p * two_n * 2.0f;
}

float torch_fexp_u20(float x) {
  const float log2e = std::bit_cast<float>(0x3fb8aa3bu);
  const float ln_flt_min = std::bit_cast<float>(0xc2aeac50u);
  const float ln_flt_max = std::bit_cast<float>(0x42b17218u);
  const float c0 = 0.00010703434948458272f, c1 = 0.30354260500649682f;
  const float c2 = float(-0.22433836478672356), c3 = float(-0.079204240219773236);
  const float a = 8388608.0f, b = 8388608.0f * 127.0f;
  float src = x * log2e;
  const float frac = src - std::floor(src);
  float r = std::fma(frac, c3, c2);
  r = std::fma(frac, r, c1);
  r = std::fma(frac, r, c0);
  src = src - r;
  const float t = std::fma(a, src, b);
  // cvttps_epi32: truncation; NaN and out-of-range give 0x80000000.
  uint32_t bits = (std::isnan(t) || t >= 2147483648.0f || t < -2147483648.0f)
                      ? 0x80000000u
                      : uint32_t(int32_t(t));
  if (x < ln_flt_min) bits = 0;
  if (x > ln_flt_max) bits = 0x7f800000u;
  return std::bit_cast<float>(bits);
}

void sgemm_nt(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
              int64_t M, int64_t N, int64_t K) {
  blas_single_threaded();
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(N), int(K), 1.0f, a, int(lda), b,
              int(ldb), 0.0f, c, int(ldc));
}

void sgemm_nn(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
              int64_t M, int64_t N, int64_t K) {
  blas_single_threaded();
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(M), int(N), int(K), 1.0f, a, int(lda),
              b, int(ldb), 0.0f, c, int(ldc));
}

float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace nanscope
