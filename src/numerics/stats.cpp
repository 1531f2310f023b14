#include "numerics/stats.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

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

namespace {

// The loops below work on the bit patterns: for IEEE formats the magnitude bits order the same
// way as the magnitudes, so max/min and range tests are integer compares that vectorise. Signed
// min/max are tracked as the largest magnitude among positive and among negative values.
// Block size keeps the 32-bit lane counters from overflowing.
constexpr size_t kBlock = 1 << 20;

template <typename U, U kExpMask, U kSignMask, U kFp16Limit>
__attribute__((optimize("tree-vectorize"))) void stats_bits(const U* x, size_t n,
                                                            ValueStats& s) {
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t e = std::min(n, b + kBlock);
    uint32_t nan = 0, inf = 0, big = 0;
    U pos_max = 0, neg_max = 0;  // magnitudes of finite positives / negatives
    U has_pos = 0, has_neg = 0;
    for (size_t i = b; i < e; ++i) {
      const U u = x[i];
      const U mag = u & U(~kSignMask);
      const bool finite = mag < kExpMask;
      nan += mag > kExpMask;
      inf += mag == kExpMask;
      big += finite && mag > kFp16Limit;
      const bool neg = (u & kSignMask) != 0;
      const U fm = finite ? mag : U(0);
      pos_max = std::max<U>(pos_max, neg ? U(0) : fm);
      neg_max = std::max<U>(neg_max, neg ? fm : U(0));
      has_pos |= U(finite && !neg);
      has_neg |= U(finite && neg);
    }
    ValueStats part;
    part.count = e - b;
    part.nan = nan;
    part.inf = inf;
    part.fp16_range = big;
    if (has_pos || has_neg) {
      part.any_finite = true;
      auto to_f = [](U bits) {
        if constexpr (sizeof(U) == 4) return std::bit_cast<float>(uint32_t(bits));
        else if constexpr (kExpMask == 0x7f80) return bf16_to_f32(uint16_t(bits));
        else return f16_to_f32(uint16_t(bits));
      };
      const float pmax = to_f(pos_max), nmax = to_f(neg_max);
      part.abs_max = std::max(pmax, nmax);
      // Largest value: the largest positive, or minus the smallest negative magnitude when all
      // are negative; a second pass is avoided by reading min/max from the extremes below.
      part.max = has_pos ? pmax : -0.0f;
      part.min = has_neg ? -nmax : 0.0f;
      if (!has_pos || !has_neg) {
        // All finite values share one sign: the other extreme needs the smallest magnitude.
        U lo = U(~U(0));
        for (size_t i = b; i < e; ++i) {
          const U mag = x[i] & U(~kSignMask);
          if (mag < kExpMask) lo = std::min(lo, mag);
        }
        if (!has_neg) part.min = to_f(lo);
        else part.max = -to_f(lo);
      }
    }
    s.merge(part);
  }
}

}  // namespace

ValueStats value_stats(const std::byte* p, size_t n, DType t) {
  ValueStats s;
  switch (t) {
    case DType::BF16:
      // 65504 is not a bf16 value: the first bf16 above it is 65536 (0x4780).
      stats_bits<uint16_t, 0x7f80, 0x8000, 0x477f>(reinterpret_cast<const uint16_t*>(p), n, s);
      break;
    case DType::F16:  // an fp16 value is never beyond the fp16 range
      stats_bits<uint16_t, 0x7c00, 0x8000, 0x7c00>(reinterpret_cast<const uint16_t*>(p), n, s);
      break;
    case DType::F32:
      stats_bits<uint32_t, 0x7f800000u, 0x80000000u, 0x477fe000u>(
          reinterpret_cast<const uint32_t*>(p), n, s);
      break;
    default:
      break;
  }
  return s;
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
