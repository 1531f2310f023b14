// Eight-lane AVX2 forms of the bf16/fp16 conversions of dtype.hpp, for kernels that keep values
// in registers from load to store (the bulk conversions of dtype.cpp, the merge's fused rows),
// and the lane counters' horizontal sum those kernels share (tensor stats, merge fidelity).
// Every lane computes exactly what the scalar function does; one definition serves both users so
// that they cannot drift apart.
#pragma once

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#define NANSCOPE_HAVE_AVX2_F16C 1

namespace nanscope::simd {

// 8 packed bf16 / fp16 -> fp32, exact (bf16: the bits moved to the top half; fp16: F16C, NaN
// quieted as f16_to_f32 does).
inline __m256 widen_bf16x8(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 widen_f16x8(__m128i h) {
  return _mm256_cvtph_ps(h);
}

// The same from 8 values at p (unaligned).
inline __m256 load_bf16x8(const std::byte* p) {
  return widen_bf16x8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load_f16x8(const std::byte* p) {
  return widen_f16x8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// fp32 -> 8 packed bf16 as f32_to_bf16: round to nearest even, NaN kept quiet.
inline __m128i to_bf16x8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                            _mm256_set1_epi32(0x7f800000));
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                           _mm256_and_si256(hi, _mm256_set1_epi32(1)))),
      16);
  const __m256i r =
      _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, _mm256_set1_epi32(0x0040)), is_nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// fp32 -> 8 packed fp16 as f32_to_f16: round to nearest even, overflow to inf.
inline __m128i to_f16x8(__m256 x) {
  return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
}

// The value each lane takes once stored in bf16 / fp16 and read back (round_bf16, round_f16).
inline __m256 round_bf16x8(__m256 x) {
  return widen_bf16x8(to_bf16x8(x));
}
inline __m256 round_f16x8(__m256 x) {
  return widen_f16x8(to_f16x8(x));
}

// The sum of eight unsigned 32-bit lane counters, without overflow.
inline uint64_t sum_u32x8(__m256i v) {
  alignas(32) uint32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  uint64_t s = 0;
  for (uint32_t x : t) s += x;
  return s;
}

}  // namespace nanscope::simd

#else
#define NANSCOPE_HAVE_AVX2_F16C 0
#endif
