// The per-row arithmetic of a LoRA merge: B@A a row at a time with fused multiply-adds in k
// order (peft's bits), the fidelity sums of the stored values, and an AVX2 kernel doing both in
// one pass. Kept apart from the merge's planning and writing so they can be tested on their own.
#include "numerics/lora_kernels.hpp"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>

#include "numerics/dtype_simd.hpp"

namespace nanscope {

// P[i, j] = sum_k L[i, k] * R[k, j], k in order, each step one fused multiply-add: the order a
// BLAS micro-kernel uses for a small inner dimension, so that the product agrees with torch's
// B @ A bit for bit in the common case (and within an ulp otherwise).
// The AVX2 path keeps 64 columns of the sum in registers over all k (the same fused
// multiply-adds in the same order, so the same bits) instead of a pass over the row per k;
// eight independent accumulators hide the FMA latency.
void lowrank_row(const float* Lrow, const float* R, int64_t r, int64_t cols, float* out) {
  int64_t j0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; j0 + 64 <= cols; j0 += 64) {
    __m256 a[8];
    for (auto& x : a) x = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m256 l = _mm256_set1_ps(Lrow[k]);
      const float* Rk = R + k * cols + j0;
      for (int q = 0; q < 8; ++q) a[q] = _mm256_fmadd_ps(l, _mm256_loadu_ps(Rk + 8 * q), a[q]);
    }
    for (int q = 0; q < 8; ++q) _mm256_storeu_ps(out + j0 + 8 * q, a[q]);
  }
  for (; j0 + 8 <= cols; j0 += 8) {
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k)
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(Lrow[k]), _mm256_loadu_ps(R + k * cols + j0), a0);
    _mm256_storeu_ps(out + j0, a0);
  }
  if (j0 == cols) return;
#endif
  for (int64_t j = j0; j < cols; ++j) out[j] = 0.0f;
  for (int64_t k = 0; k < r; ++k) {
    const float l = Lrow[k];
    const float* Rk = R + k * cols;
    for (int64_t j = j0; j < cols; ++j) out[j] = std::fma(l, Rk[j], out[j]);
  }
}

namespace {

#if defined(__AVX2__)
// The fidelity sums of one row as AVX2 accumulators: sum (r - w0)^2, sum (s - w0)^2,
// sum (r - w0)(s - w0), sum (r - s)^2 over the updated elements, and the counts. Reduced into
// FidelitySums once per row (row_stats_end), so that the sums come out the same whether a row is
// fed in one go or in column chunks.
//
// Two tiers. The common chunk of 8 (every value finite, differences below 2^48) adds its terms
// with fp32 fused multiply-adds into eight float lanes, which are moved into the double lanes
// every kFlush chunks: a lane then never sums more than kFlush terms in fp32 (relative error of
// the figures ~1e-6, against the 6 digits they are reported with), at a third of the cost of
// converting every element to double. A chunk holding NaN/inf or huge differences takes the
// exact double path, which also counts the non-finite values. Where the stored value equals the
// ideal one (fp32 output) both tiers see identical terms for num, den and dot, so kept and
// projected are exactly 1 and the error exactly 0.
struct RowSums {
  static constexpr int kFlush = 32;
  __m256d num = _mm256_setzero_pd(), den = _mm256_setzero_pd(), dot = _mm256_setzero_pd(),
          err = _mm256_setzero_pd();
  __m256 fnum = _mm256_setzero_ps(), fden = _mm256_setzero_ps(), fdot = _mm256_setzero_ps(),
         ferr = _mm256_setzero_ps();
  int pending = 0;  // fp32 chunks not yet moved into the double lanes
};
// Element counts as 32-bit lane counters (a mask lane of -1 subtracted adds 1), so that counting
// is one vector op per 8 elements; moved into FidelitySums by add_counts often enough not to
// overflow. w_ok, r_ok and elements count only the chunks of the double path (the fp32 path's are
// all finite).
struct LaneCounts {
  __m256i w_ok = _mm256_setzero_si256(), r_ok = _mm256_setzero_si256(),
          s_ok = _mm256_setzero_si256(), updated = _mm256_setzero_si256(),
          lost = _mm256_setzero_si256();
  uint64_t elements = 0;
};

inline __m256d add_halves_pd(__m256d acc, __m256 v) {
  acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

// Moves the fp32 lanes into the double lanes.
inline void flush_sums(RowSums& a) {
  a.num = add_halves_pd(a.num, a.fnum);
  a.den = add_halves_pd(a.den, a.fden);
  a.dot = add_halves_pd(a.dot, a.fdot);
  a.err = add_halves_pd(a.err, a.ferr);
  a.fnum = a.fden = a.fdot = a.ferr = _mm256_setzero_ps();
  a.pending = 0;
}

// The exact tier: 8 elements in double. An element counts where s != w and both are finite
// (then s - w in double is finite and non-zero).
inline void row_stats8_double(__m256 w8, __m256 s8, __m256 r8, RowSums& a, LaneCounts& c) {
  const __m256 fabs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 finf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  // isfinite: |x| < inf is false for inf and NaN.
  const __m256 w_ok = _mm256_cmp_ps(_mm256_and_ps(w8, fabs_mask), finf, _CMP_LT_OQ);
  const __m256 r_ok = _mm256_cmp_ps(_mm256_and_ps(r8, fabs_mask), finf, _CMP_LT_OQ);
  const __m256 s_ok = _mm256_cmp_ps(_mm256_and_ps(s8, fabs_mask), finf, _CMP_LT_OQ);
  const __m256 upd = _mm256_and_ps(_mm256_cmp_ps(s8, w8, _CMP_NEQ_UQ), _mm256_and_ps(w_ok, s_ok));
  const __m256 lost = _mm256_and_ps(upd, _mm256_cmp_ps(r8, w8, _CMP_EQ_OQ));
  c.w_ok = _mm256_sub_epi32(c.w_ok, _mm256_castps_si256(w_ok));
  c.r_ok = _mm256_sub_epi32(c.r_ok, _mm256_castps_si256(r_ok));
  c.s_ok = _mm256_sub_epi32(c.s_ok, _mm256_castps_si256(s_ok));
  c.updated = _mm256_sub_epi32(c.updated, _mm256_castps_si256(upd));
  c.lost = _mm256_sub_epi32(c.lost, _mm256_castps_si256(lost));
  c.elements += 8;
  const unsigned m8 = unsigned(_mm256_movemask_ps(upd));
  if (!m8) return;
  for (int h = 0; h < 2; ++h) {
    const unsigned mm = (m8 >> (4 * h)) & 0xf;
    if (!mm) continue;
    const __m128 wh = h ? _mm256_extractf128_ps(w8, 1) : _mm256_castps256_ps128(w8);
    const __m128 sh = h ? _mm256_extractf128_ps(s8, 1) : _mm256_castps256_ps128(s8);
    const __m128 rh = h ? _mm256_extractf128_ps(r8, 1) : _mm256_castps256_ps128(r8);
    const __m256d wd = _mm256_cvtps_pd(wh);
    __m256d di = _mm256_sub_pd(_mm256_cvtps_pd(sh), wd);
    __m256d dk = _mm256_sub_pd(_mm256_cvtps_pd(rh), wd);
    if (mm != 0xf) {  // elements left out add +0, as before
      const __m256d m = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(
          _mm_castps_si128(h ? _mm256_extractf128_ps(upd, 1) : _mm256_castps256_ps128(upd))));
      di = _mm256_and_pd(di, m);
      dk = _mm256_and_pd(dk, m);
    }
    const __m256d e = _mm256_sub_pd(dk, di);
    a.num = _mm256_add_pd(a.num, _mm256_mul_pd(dk, dk));
    a.den = _mm256_add_pd(a.den, _mm256_mul_pd(di, di));
    a.dot = _mm256_add_pd(a.dot, _mm256_mul_pd(dk, di));
    a.err = _mm256_add_pd(a.err, _mm256_mul_pd(e, e));
  }
}

// Adds 8 elements: w8 the base values, s8 the ideal fp32 result, r8 = s8 as stored.
inline void row_stats8(__m256 w8, __m256 s8, __m256 r8, RowSums& a, LaneCounts& c) {
  const __m256 fabs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 di = _mm256_sub_ps(s8, w8);
  const __m256 dk_all = _mm256_sub_ps(r8, w8);
  // NaN or inf in any of w, s, r makes di or dk NaN/inf, and so the sum of magnitudes, which
  // then fails the ordered compare.
  const __m256 mag = _mm256_add_ps(_mm256_and_ps(di, fabs_mask), _mm256_and_ps(dk_all, fabs_mask));
  if (_mm256_movemask_ps(_mm256_cmp_ps(mag, _mm256_set1_ps(0x1p48f), _CMP_LT_OQ)) != 0xff) {
    row_stats8_double(w8, s8, r8, a, c);
    return;
  }
  const __m256 upd = _mm256_cmp_ps(s8, w8, _CMP_NEQ_OQ);
  // Not updated (s == w): di is 0; dk may not be where the output dtype differs from the base's.
  const __m256 dk = _mm256_and_ps(dk_all, upd);
  const __m256 e = _mm256_sub_ps(dk, di);
  a.fnum = _mm256_fmadd_ps(dk, dk, a.fnum);
  a.fden = _mm256_fmadd_ps(di, di, a.fden);
  a.fdot = _mm256_fmadd_ps(dk, di, a.fdot);
  a.ferr = _mm256_fmadd_ps(e, e, a.ferr);
  c.updated = _mm256_sub_epi32(c.updated, _mm256_castps_si256(upd));
  c.lost = _mm256_sub_epi32(
      c.lost, _mm256_castps_si256(_mm256_and_ps(upd, _mm256_cmp_ps(r8, w8, _CMP_EQ_OQ))));
  if (++a.pending == RowSums::kFlush) flush_sums(a);
}

inline void row_stats_end(RowSums& a, FidelitySums& st) {
  flush_sums(a);
  alignas(32) double v[4][4];
  _mm256_store_pd(v[0], a.num);
  _mm256_store_pd(v[1], a.den);
  _mm256_store_pd(v[2], a.dot);
  _mm256_store_pd(v[3], a.err);
  st.num += (v[0][0] + v[0][1]) + (v[0][2] + v[0][3]);
  st.den += (v[1][0] + v[1][1]) + (v[1][2] + v[1][3]);
  st.dot += (v[2][0] + v[2][1]) + (v[2][2] + v[2][3]);
  st.err += (v[3][0] + v[3][1]) + (v[3][2] + v[3][3]);
}

// Moves the counts into st and clears them.
inline void add_counts(LaneCounts& c, FidelitySums& st) {
  st.updated += simd::sum_u32x8(c.updated);
  st.lost += simd::sum_u32x8(c.lost);
  st.base_nonfinite += c.elements - simd::sum_u32x8(c.w_ok);
  st.nonfinite += c.elements - simd::sum_u32x8(c.r_ok);
  st.ideal_nonfinite += c.elements - simd::sum_u32x8(c.s_ok);
  c = LaneCounts{};
}
#endif

}  // namespace

void row_stats(const float* w0, const float* s, const float* r, int64_t n, FidelitySums& st) {
  int64_t k = 0;
#if defined(__AVX2__)
  {
    RowSums a;
    LaneCounts c;
    for (; k + 8 <= n; k += 8)
      row_stats8(_mm256_loadu_ps(w0 + k), _mm256_loadu_ps(s + k), _mm256_loadu_ps(r + k), a, c);
    row_stats_end(a, st);
    add_counts(c, st);
  }
#endif
  for (; k < n; ++k) {
    const double d_ideal = double(s[k]) - double(w0[k]);
    if (!std::isfinite(w0[k])) ++st.base_nonfinite;
    if (!std::isfinite(r[k])) ++st.nonfinite;
    if (!std::isfinite(s[k])) ++st.ideal_nonfinite;
    if (d_ideal != 0.0 && std::isfinite(d_ideal)) {
      const double d_kept = double(r[k]) - double(w0[k]);
      st.num += d_kept * d_kept;
      st.den += d_ideal * d_ideal;
      st.dot += d_kept * d_ideal;
      st.err += (d_kept - d_ideal) * (d_kept - d_ideal);
      ++st.updated;
      if (r[k] == w0[k]) ++st.lost;
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__) && NANSCOPE_HAVE_AVX2_F16C
namespace {

// The common case in one pass, for a weight with exactly one plain LoRA (no DoRA, bias, token
// rows or replacement) and cols % 8 == 0: W' = round(W + fl(fl(L@R) * scale)) row by row.
// The generic path runs B@A a whole row at a time (one row of L against all of R, up to 200 KB,
// past L1) and passes each row through four fp32 scratch arrays. Here B@A is computed in tiles
// of 4 rows x 24 columns held in 12 accumulators: each loaded slice of R serves 4 rows and each
// broadcast of L 3 vectors, so the FMAs, not the loads, set the pace, and 12 independent chains
// cover the FMA latency. Each finished tile goes from the accumulators through scale, add,
// rounding, store and the fidelity sums in registers. Same fused multiply-adds in the same k
// order and the same roundings as the generic path; each row's sums are fed in column order into
// that row's own accumulators: bit-identical output and statistics.
template <DType S, DType O>
class FusedLora {
 public:
  static constexpr size_t kSrcEs = S == DType::F32 ? 4 : 2;
  static constexpr size_t kOutEs = O == DType::F32 ? 4 : 2;
  static constexpr int64_t kGroup = 8;  // rows sharing each slice of R while it is in L1

  FusedLora(const std::byte* src, const LowRankFactors& p, int64_t cols, int64_t i0, std::byte* out)
      : src_(src), p_(p), cols_(cols), i0_(i0), out_(out), scale_(_mm256_set1_ps(p.scale)) {}

  // Rows [i0, i1): out holds row i0 first.
  void rows(int64_t i1, FidelitySums& st) {
    for (int64_t g0 = i0_; g0 < i1; g0 += kGroup) {
      const int64_t g1 = std::min(i1, g0 + kGroup);
      for (auto& a : sums_) a = RowSums{};
      prefetch_rows(g1, std::min(i1, g1 + kGroup));
      int64_t j0 = 0;
      for (; j0 + 24 <= cols_; j0 += 24) tiles<3>(g0, g1, j0);
      for (; j0 < cols_; j0 += 8) tiles<1>(g0, g1, j0);
      for (int64_t i = g0; i < g1; ++i) row_stats_end(sums_[i - g0], st);
      add_counts(counts_, st);
    }
  }

 private:
  // The base rows of the next group, into the cache while this group computes: read once each
  // in 48-byte steps of four rows at a time, they would otherwise stall every tile on memory.
  void prefetch_rows(int64_t b, int64_t e) const {
    const char* p = reinterpret_cast<const char*>(src_ + size_t(b * cols_) * kSrcEs);
    const char* end = reinterpret_cast<const char*>(src_ + size_t(e * cols_) * kSrcEs);
    for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T0);
  }

  template <int C>
  void tiles(int64_t g0, int64_t g1, int64_t j0) {
    int64_t i = g0;
    for (; i + 4 <= g1; i += 4) tile<4, C>(i, g0, j0);
    for (; i < g1; ++i) tile<1, C>(i, g0, j0);
  }

  // Rows [i, i + M) x columns [j0, j0 + 8 C).
  template <int M, int C>
  void tile(int64_t i, int64_t g0, int64_t j0) {
    const int64_t r = p_.r;
    const float* L = p_.L.data() + i * r;
    const float* R = p_.R.data() + j0;
    // The accumulators live in registers only if every index is a constant after unrolling;
    // the products leave them through one store each.
    __m256 a[M][C];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) a[m][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      __m256 rv[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) rv[c] = _mm256_loadu_ps(R + k * cols_ + 8 * c);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const __m256 l = _mm256_broadcast_ss(L + m * r + k);
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) a[m][c] = _mm256_fmadd_ps(l, rv[c], a[m][c]);
      }
    }
    alignas(32) float prod[M][C][8];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) _mm256_store_ps(prod[m][c], a[m][c]);
    LaneCounts counts = counts_;  // in registers for the tile, not read-modify-written
    for (int m = 0; m < M; ++m) {
      RowSums rs = sums_[i + m - g0];
      for (int c = 0; c < C; ++c)
        finish8(_mm256_load_ps(prod[m][c]), i + m, j0 + 8 * c, rs, counts);
      sums_[i + m - g0] = rs;
    }
    counts_ = counts;
  }

  // W0 + fl(P * scale) for 8 elements of row i at column j: stored, and added to the sums.
  void finish8(__m256 prod, int64_t i, int64_t j, RowSums& a, LaneCounts& counts) {
    const __m256 w = load8(src_ + size_t(i * cols_ + j) * kSrcEs);
    const __m256 s = _mm256_add_ps(w, _mm256_mul_ps(prod, scale_));
    const __m256 stored = store8(s, out_ + size_t((i - i0_) * cols_ + j) * kOutEs);
    row_stats8(w, s, stored, a, counts);
  }

  static __m256 load8(const std::byte* q) {
    if constexpr (S == DType::BF16) return simd::load_bf16x8(q);
    if constexpr (S == DType::F16) return simd::load_f16x8(q);
    if constexpr (S == DType::F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(q));
  }
  // Stores 8 values in the output dtype; returns them as a reader of the file sees them.
  static __m256 store8(__m256 v, std::byte* q) {
    if constexpr (O == DType::BF16) {
      const __m128i h = simd::to_bf16x8(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), h);
      return simd::widen_bf16x8(h);
    }
    if constexpr (O == DType::F16) {
      const __m128i h = simd::to_f16x8(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), h);
      return simd::widen_f16x8(h);
    }
    if constexpr (O == DType::F32) {
      _mm256_storeu_ps(reinterpret_cast<float*>(q), v);
      return v;
    }
  }

  const std::byte* src_;
  const LowRankFactors& p_;
  int64_t cols_, i0_;
  std::byte* out_;
  __m256 scale_;
  RowSums sums_[kGroup];
  LaneCounts counts_;
};

template <DType S, DType O>
void fused_lora_rows(const std::byte* src, const LowRankFactors& p, int64_t cols, int64_t i0,
                     int64_t i1, std::byte* out, FidelitySums& st) {
  FusedLora<S, O>(src, p, cols, i0, out).rows(i1, st);
}

}  // namespace
#endif

FusedRows fused_lora_kernel(DType src, DType out) {
#if defined(__AVX2__) && defined(__FMA__) && NANSCOPE_HAVE_AVX2_F16C
  auto pick = [&]<DType S>() -> FusedRows {
    switch (out) {
      case DType::BF16:
        return &fused_lora_rows<S, DType::BF16>;
      case DType::F16:
        return &fused_lora_rows<S, DType::F16>;
      case DType::F32:
        return &fused_lora_rows<S, DType::F32>;
      default:
        return nullptr;
    }
  };
  switch (src) {
    case DType::BF16:
      return pick.template operator()<DType::BF16>();
    case DType::F16:
      return pick.template operator()<DType::F16>();
    case DType::F32:
      return pick.template operator()<DType::F32>();
    default:
      return nullptr;
  }
#else
  (void)src, (void)out;
  return nullptr;
#endif
}

}  // namespace nanscope
