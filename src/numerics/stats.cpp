#include "numerics/stats.hpp"

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "numerics/dtype_simd.hpp"

namespace nanscope {

void ValueStats::merge(const ValueStats& o) {
  count += o.count;
  nan += o.nan;
  inf += o.inf;
  fp16_range += o.fp16_range;
  abs_max = std::max(abs_max, o.abs_max);
  if (o.any_finite) {
    min = any_finite ? std::min(min, o.min) : o.min;
    max = any_finite ? std::max(max, o.max) : o.max;
    any_finite = true;
  }
}

bool all_finite(std::span<const float> x) {
  for (float f : x)
    if (!std::isfinite(f)) return false;
  return true;
}

bool all_finite_stored(std::span<const std::byte> bytes, DType t) {
  // Branch-free per block so that the compiler vectorises the test.
  const auto none_max_exponent = [&](auto word, auto mask) {
    using W = decltype(word);
    const size_t n = bytes.size() / sizeof(W);
    for (size_t i = 0; i < n; i += 256) {
      const size_t e = std::min(n, i + 256);
      bool bad = false;
      for (size_t j = i; j < e; ++j) {
        W w;
        std::memcpy(&w, bytes.data() + j * sizeof(W), sizeof(W));
        bad |= (w & mask) == mask;
      }
      if (bad) return false;
    }
    return true;
  };
  switch (t) {
    case DType::F32:
      return none_max_exponent(uint32_t{}, uint32_t{0x7f800000u});
    case DType::BF16:
      return none_max_exponent(uint16_t{}, uint16_t{0x7f80u});
    case DType::F16:
      return none_max_exponent(uint16_t{}, uint16_t{0x7c00u});
    default:
      throw std::logic_error("all_finite_stored: not a float dtype");
  }
}

namespace {

// The loops work on bit patterns: for IEEE formats the magnitude bits order the same way as the
// magnitudes, so NaN/inf tests, the fp16-range test and min/max are integer compares. Signed
// min/max come from the largest and smallest magnitudes among positive and among negative
// finite values. Written with AVX2 intrinsics because the compiler does not vectorise the
// mixed-width counting on its own (0.2 GB/s scalar against memory speed vectorised).
template <typename U>
struct Acc {
  uint64_t nan = 0, inf = 0, big = 0;
  U pos_max = 0, neg_max = 0;                          // largest magnitudes
  U pos_min = U(~U(0) >> 1), neg_min = U(~U(0) >> 1);  // smallest magnitudes
  bool has_pos = false, has_neg = false;

  void scalar(U u, U exp_mask, U sign_mask, U limit) {
    const U mag = u & U(~sign_mask);
    if (mag > exp_mask) {
      ++nan;
      return;
    }
    if (mag == exp_mask) {
      ++inf;
      return;
    }
    big += mag > limit;
    if (u & sign_mask) {
      has_neg = true;
      neg_max = std::max(neg_max, mag);
      neg_min = std::min(neg_min, mag);
    } else {
      has_pos = true;
      pos_max = std::max(pos_max, mag);
      pos_min = std::min(pos_min, mag);
    }
  }
};

inline uint16_t hreduce16(__m256i v, bool want_max) {
  alignas(32) uint16_t t[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  uint16_t r = t[0];
  for (uint16_t x : t) r = want_max ? std::max(r, x) : std::min(r, x);
  return r;
}
inline uint32_t hreduce32(__m256i v, bool want_max) {
  alignas(32) uint32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  uint32_t r = t[0];
  for (uint32_t x : t) r = want_max ? std::max(r, x) : std::min(r, x);
  return r;
}

void stats16(const uint16_t* x, size_t n, uint16_t exp_mask, uint16_t limit, Acc<uint16_t>& a) {
  const __m256i vabs = _mm256_set1_epi16(0x7fff), vexp = _mm256_set1_epi16(int16_t(exp_mask)),
                vlim = _mm256_set1_epi16(int16_t(limit)), ones = _mm256_set1_epi16(1);
  __m256i pmax = _mm256_setzero_si256(), nmax = pmax, hpos = pmax, hneg = pmax;
  __m256i pmin = vabs, nmin = vabs;
  size_t i = 0;
  // 16-bit lane counters hold up to 32767 vectors before they are flushed into 64-bit totals.
  while (i + 16 <= n) {
    __m256i cnan = _mm256_setzero_si256(), cinf = cnan, cbig = cnan;
    const size_t stop = std::min(n - (n - i) % 16, i + 16 * size_t(32767));
    for (; i < stop; i += 16) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
      const __m256i mag = _mm256_and_si256(u, vabs);  // as int16 these are >= 0
      const __m256i is_nan = _mm256_cmpgt_epi16(mag, vexp);
      const __m256i is_inf = _mm256_cmpeq_epi16(mag, vexp);
      const __m256i fin = _mm256_cmpgt_epi16(vexp, mag);
      const __m256i neg = _mm256_srai_epi16(u, 15);
      cnan = _mm256_sub_epi16(cnan, is_nan);
      cinf = _mm256_sub_epi16(cinf, is_inf);
      cbig = _mm256_sub_epi16(cbig, _mm256_and_si256(fin, _mm256_cmpgt_epi16(mag, vlim)));
      const __m256i fpos = _mm256_andnot_si256(neg, fin), fneg = _mm256_and_si256(neg, fin);
      pmax = _mm256_max_epi16(pmax, _mm256_and_si256(fpos, mag));
      nmax = _mm256_max_epi16(nmax, _mm256_and_si256(fneg, mag));
      pmin = _mm256_min_epi16(pmin, _mm256_blendv_epi8(vabs, mag, fpos));
      nmin = _mm256_min_epi16(nmin, _mm256_blendv_epi8(vabs, mag, fneg));
      hpos = _mm256_or_si256(hpos, fpos);
      hneg = _mm256_or_si256(hneg, fneg);
    }
    a.nan += simd::sum_u32x8(_mm256_madd_epi16(cnan, ones));
    a.inf += simd::sum_u32x8(_mm256_madd_epi16(cinf, ones));
    a.big += simd::sum_u32x8(_mm256_madd_epi16(cbig, ones));
  }
  if (!_mm256_testz_si256(hpos, hpos)) {
    a.has_pos = true;
    a.pos_max = std::max(a.pos_max, hreduce16(pmax, true));
    a.pos_min = std::min(a.pos_min, hreduce16(pmin, false));
  }
  if (!_mm256_testz_si256(hneg, hneg)) {
    a.has_neg = true;
    a.neg_max = std::max(a.neg_max, hreduce16(nmax, true));
    a.neg_min = std::min(a.neg_min, hreduce16(nmin, false));
  }
  for (; i < n; ++i) a.scalar(x[i], exp_mask, 0x8000, limit);
}

void stats32(const uint32_t* x, size_t n, Acc<uint32_t>& a) {
  const uint32_t exp_mask = 0x7f800000u, limit = 0x477fe000u;  // 65504
  const __m256i vabs = _mm256_set1_epi32(0x7fffffff), vexp = _mm256_set1_epi32(int32_t(exp_mask)),
                vlim = _mm256_set1_epi32(int32_t(limit));
  __m256i pmax = _mm256_setzero_si256(), nmax = pmax, hpos = pmax, hneg = pmax;
  __m256i pmin = vabs, nmin = vabs, cnan = pmax, cinf = pmax, cbig = pmax;
  size_t i = 0;
  // 32-bit lane counters: flushed every 2^30 vectors at the latest, i.e. never overflow.
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    const __m256i mag = _mm256_and_si256(u, vabs);
    const __m256i fin = _mm256_cmpgt_epi32(vexp, mag);
    const __m256i neg = _mm256_srai_epi32(u, 31);
    cnan = _mm256_sub_epi32(cnan, _mm256_cmpgt_epi32(mag, vexp));
    cinf = _mm256_sub_epi32(cinf, _mm256_cmpeq_epi32(mag, vexp));
    cbig = _mm256_sub_epi32(cbig, _mm256_and_si256(fin, _mm256_cmpgt_epi32(mag, vlim)));
    const __m256i fpos = _mm256_andnot_si256(neg, fin), fneg = _mm256_and_si256(neg, fin);
    pmax = _mm256_max_epi32(pmax, _mm256_and_si256(fpos, mag));
    nmax = _mm256_max_epi32(nmax, _mm256_and_si256(fneg, mag));
    pmin = _mm256_min_epi32(pmin, _mm256_blendv_epi8(vabs, mag, fpos));
    nmin = _mm256_min_epi32(nmin, _mm256_blendv_epi8(vabs, mag, fneg));
    hpos = _mm256_or_si256(hpos, fpos);
    hneg = _mm256_or_si256(hneg, fneg);
  }
  a.nan += simd::sum_u32x8(cnan);
  a.inf += simd::sum_u32x8(cinf);
  a.big += simd::sum_u32x8(cbig);
  if (!_mm256_testz_si256(hpos, hpos)) {
    a.has_pos = true;
    a.pos_max = std::max(a.pos_max, hreduce32(pmax, true));
    a.pos_min = std::min(a.pos_min, hreduce32(pmin, false));
  }
  if (!_mm256_testz_si256(hneg, hneg)) {
    a.has_neg = true;
    a.neg_max = std::max(a.neg_max, hreduce32(nmax, true));
    a.neg_min = std::min(a.neg_min, hreduce32(nmin, false));
  }
  for (; i < n; ++i) a.scalar(x[i], exp_mask, 0x80000000u, limit);
}

template <typename U, typename ToFloat>
ValueStats finish(const Acc<U>& a, size_t n, ToFloat to_f) {
  ValueStats s;
  s.count = n;
  s.nan = a.nan;
  s.inf = a.inf;
  s.fp16_range = a.big;
  if (a.has_pos || a.has_neg) {
    s.any_finite = true;
    s.abs_max = std::max(a.has_pos ? to_f(a.pos_max) : 0.0f, a.has_neg ? to_f(a.neg_max) : 0.0f);
    s.max = a.has_pos ? to_f(a.pos_max) : -to_f(a.neg_min);
    s.min = a.has_neg ? -to_f(a.neg_max) : to_f(a.pos_min);
  }
  return s;
}

}  // namespace

ValueStats value_stats(const std::byte* p, size_t n, DType t) {
  switch (t) {
    case DType::BF16: {
      // 65504 is not a bf16 value: the first bf16 above it is 65536 (0x4780).
      Acc<uint16_t> a;
      stats16(reinterpret_cast<const uint16_t*>(p), n, 0x7f80, 0x477f, a);
      return finish(a, n, [](uint16_t b) { return bf16_to_f32(b); });
    }
    case DType::F16: {  // an fp16 value is never beyond the fp16 range
      Acc<uint16_t> a;
      stats16(reinterpret_cast<const uint16_t*>(p), n, 0x7c00, 0x7c00, a);
      return finish(a, n, [](uint16_t b) { return f16_to_f32(b); });
    }
    case DType::F32: {
      Acc<uint32_t> a;
      stats32(reinterpret_cast<const uint32_t*>(p), n, a);
      return finish(a, n, [](uint32_t b) { return std::bit_cast<float>(b); });
    }
    default:
      return ValueStats{};
  }
}

ValueStats value_stats(std::span<const float> x) {
  return value_stats(reinterpret_cast<const std::byte*>(x.data()), x.size(), DType::F32);
}

ValueStats value_stats_reference(const std::byte* p, size_t n, DType t) {
  ValueStats s;
  for (size_t i = 0; i < n; ++i) {
    const float v = load_as_f32(p, t, i);
    ++s.count;
    if (std::isnan(v)) {
      ++s.nan;
    } else if (std::isinf(v)) {
      ++s.inf;
    } else {
      if (std::fabs(v) > 65504.0f) ++s.fp16_range;
      s.abs_max = std::max(s.abs_max, std::fabs(v));
      s.min = s.any_finite ? std::min(s.min, v) : v;
      s.max = s.any_finite ? std::max(s.max, v) : v;
      s.any_finite = true;
    }
  }
  return s;
}

}  // namespace nanscope
