// The bf16/fp16 conversions against independent references: a double-precision rounding model
// written here, the F16C instruction, and exhaustive round trips of every 16-bit pattern.
#include <gtest/gtest.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "numerics/dtype.hpp"

namespace nanscope {
namespace {

uint32_t bits(float f) {
  return std::bit_cast<uint32_t>(f);
}
bool is_nan16(uint16_t h) {
  return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0;
}
bool is_nan_bf16(uint16_t h) {
  return (h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0;
}

// Round |x| (finite) to a binary format with `precision` significant bits, smallest normal
// exponent `emin` and overflow threshold `limit` (values that round to >= limit become inf).
// Done in double, where every step below is exact, with nearbyint doing round-half-even.
float reference_round(float x, int precision, int emin, double limit) {
  const double a = std::fabs(double(x));
  if (a == 0) return x;
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const int exp = std::max(e - 1, emin);
  const double ulp = std::ldexp(1.0, exp - (precision - 1));
  double r = std::nearbyint(a / ulp) * ulp;
  if (r >= limit) r = std::numeric_limits<double>::infinity();
  return float(std::copysign(r, double(x)));
}
float reference_f16(float x) {
  return reference_round(x, 11, -14, 65536.0);
}
float reference_bf16(float x) {
  return reference_round(x, 8, -126, std::ldexp(1.0, 128));
}

// F16C single-value conversion, the hardware's answer.
uint16_t hw_f32_to_f16(float x) {
  return uint16_t(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
}

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> v(n);
  std::uniform_int_distribution<uint32_t> any;
  std::uniform_real_distribution<float> mag(-30.0f, 18.0f);  // around the fp16 range
  for (size_t i = 0; i < n; ++i) {
    switch (i % 4) {
      case 0:  // any bit pattern: NaNs with payloads, infs, subnormals
        v[i] = std::bit_cast<float>(any(rng));
        break;
      case 1:  // magnitudes around fp16's range
        v[i] = std::ldexp(1.0f + float(any(rng) % (1u << 23)) * 0x1p-23f, int(mag(rng))) *
               ((any(rng) & 1) ? -1.0f : 1.0f);
        break;
      case 2: {  // exact ties of fp16 and bf16 (low bits 1000...)
        const uint32_t u = any(rng);
        v[i] = std::bit_cast<float>((u & ~0x1fffu) | ((u & 1) ? 0x1000u : 0x8000u));
        break;
      }
      default:
        v[i] = std::bit_cast<float>(any(rng) & 0x807fffffu);  // fp32 subnormals and zeros
        break;
    }
  }
  return v;
}

TEST(DtypeTable, BitsNamesAndParse) {
  struct Row {
    DType t;
    const char* name;
    int bits;
  };
  const Row rows[] = {
      {DType::BOOL, "BOOL", 8},       {DType::U8, "U8", 8},
      {DType::I8, "I8", 8},           {DType::F8_E5M2, "F8_E5M2", 8},
      {DType::F8_E4M3, "F8_E4M3", 8}, {DType::F8_E8M0, "F8_E8M0", 8},
      {DType::F4, "F4", 4},           {DType::F6_E2M3, "F6_E2M3", 6},
      {DType::F6_E3M2, "F6_E3M2", 6}, {DType::I16, "I16", 16},
      {DType::U16, "U16", 16},        {DType::F16, "F16", 16},
      {DType::BF16, "BF16", 16},      {DType::I32, "I32", 32},
      {DType::U32, "U32", 32},        {DType::F32, "F32", 32},
      {DType::F64, "F64", 64},        {DType::I64, "I64", 64},
      {DType::U64, "U64", 64},        {DType::C64, "C64", 64},
  };
  for (const Row& r : rows) {
    EXPECT_EQ(dtype_bits(r.t), r.bits) << r.name;
    EXPECT_EQ(dtype_name(r.t), r.name);
    ASSERT_TRUE(parse_dtype(r.name).has_value()) << r.name;
    EXPECT_EQ(*parse_dtype(r.name), r.t);
  }
  EXPECT_FALSE(parse_dtype("bf16").has_value());  // case matters, as in the reference
  EXPECT_FALSE(parse_dtype("F128").has_value());
  EXPECT_FALSE(parse_dtype("").has_value());
}

TEST(DtypeLimits, MaxAndLowest) {
  EXPECT_EQ(dtype_max(DType::F32), 3.4028235e38f);
  EXPECT_EQ(dtype_max(DType::BF16), 3.3895314e38f);
  EXPECT_EQ(dtype_max(DType::F16), 65504.0f);
  EXPECT_EQ(dtype_lowest(DType::F32), -3.4028235e38f);
  EXPECT_EQ(dtype_lowest(DType::BF16), -3.3895314e38f);
  EXPECT_EQ(dtype_lowest(DType::F16), -65504.0f);
  // Each maximum is a value of its own type.
  EXPECT_EQ(round_bf16(dtype_max(DType::BF16)), dtype_max(DType::BF16));
  EXPECT_EQ(round_f16(dtype_max(DType::F16)), dtype_max(DType::F16));
  EXPECT_THROW(dtype_max(DType::I32), std::invalid_argument);
}

// Every bf16 pattern survives bf16 -> f32 -> bf16; signalling NaNs come back quieted (bit 6 set,
// the rest of the payload kept), as torch and the F16C-style converters do.
TEST(DtypeBf16, AllPatternsRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t back = f32_to_bf16(bf16_to_f32(uint16_t(h)));
    if (is_nan_bf16(uint16_t(h))) {
      EXPECT_EQ(back, h | 0x0040u) << std::hex << h;
    } else {
      ASSERT_EQ(back, h) << std::hex << h;
    }
  }
}

// Every fp16 pattern survives fp16 -> f32 -> fp16; NaNs come back quieted (bit 9 set).
TEST(DtypeF16, AllPatternsRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(uint16_t(h));
    const uint16_t back = f32_to_f16(f);
    if (is_nan16(uint16_t(h))) {
      EXPECT_TRUE(std::isnan(f));
      EXPECT_EQ(back, h | 0x0200u) << std::hex << h;
    } else {
      ASSERT_EQ(back, h) << std::hex << h;
      // The value is the one the format defines: (-1)^s * 2^(e-15) * 1.m, or 2^-14 * 0.m.
      const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
      const double mag = e == 31  ? std::numeric_limits<double>::infinity()
                         : e == 0 ? std::ldexp(double(m), -24)
                                  : std::ldexp(1024.0 + m, e - 25);
      ASSERT_EQ(double(f), (h & 0x8000) ? -mag : mag) << std::hex << h;
    }
  }
}

// Decoding agrees with the F16C instruction for all patterns, NaNs included.
TEST(DtypeF16, DecodeMatchesF16C) {
  for (uint32_t h = 0; h < 65536; ++h) {
    ASSERT_EQ(bits(f16_to_f32(uint16_t(h))), bits(_cvtsh_ss(uint16_t(h)))) << std::hex << h;
  }
}

TEST(DtypeF16, EdgeCases) {
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65519.99f), 0x7bff);  // just below the midpoint to 65536
  EXPECT_EQ(f32_to_f16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // the tie rounds to even: 2^16, i.e. inf
  EXPECT_EQ(f32_to_f16(-65520.0f), 0xfc00);
  EXPECT_EQ(f32_to_f16(1e10f), 0x7c00);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(f32_to_f16(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_TRUE(is_nan16(f32_to_f16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(is_nan16(f32_to_f16(std::bit_cast<float>(0x7f800001u))));  // payload in low bits
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  // Subnormals: smallest 2^-24; 2^-25 is a tie and goes to even (zero); just above goes up.
  EXPECT_EQ(f32_to_f16(0x1p-24f), 0x0001);
  EXPECT_EQ(f32_to_f16(0x1p-25f), 0x0000);
  EXPECT_EQ(f32_to_f16(std::nextafter(0x1p-25f, 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_f16(-0x1p-25f), 0x8000);
  EXPECT_EQ(f32_to_f16(3 * 0x1p-25f), 0x0002);        // tie between 1 and 2 units: even
  EXPECT_EQ(f32_to_f16(5 * 0x1p-25f), 0x0002);        // tie between 2 and 3 units: even
  EXPECT_EQ(f32_to_f16(1023 * 0x1p-24f), 0x03ff);     // largest subnormal
  EXPECT_EQ(f32_to_f16(1023.5f * 0x1p-24f), 0x0400);  // tie into the smallest normal
  EXPECT_EQ(f32_to_f16(0x1p-14f), 0x0400);
  EXPECT_EQ(f32_to_f16(std::nextafter(0x1p-14f, 0.0f)), 0x0400);
  EXPECT_EQ(f16_to_f32(0x0001), 0x1p-24f);
  EXPECT_EQ(f16_to_f32(0x03ff), 1023 * 0x1p-24f);
  // Normal ties: 1 + 2^-11 -> 1 (even), 1 + 3*2^-11 -> 1 + 2^-9.
  EXPECT_EQ(f32_to_f16(1.0f + 0x1p-11f), 0x3c00);
  EXPECT_EQ(f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);
  EXPECT_EQ(f32_to_f16(2047.5f), 0x6800);  // 2047.5 -> 2048 (tie to even)
  EXPECT_EQ(round_f16(2049.0f), 2048.0f);
  EXPECT_EQ(round_to(1e5f, DType::F16), std::numeric_limits<float>::infinity());
  EXPECT_EQ(round_to(1.2345678f, DType::F32), 1.2345678f);
}

TEST(DtypeBf16, EdgeCases) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3f808000u)), 0x3f80);  // tie, even stays
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3f818000u)), 0x3f82);  // tie, odd goes up
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3f808001u)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds to inf
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x00008000u)), 0x0000);  // subnormal tie
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x00018000u)), 0x0002);
  EXPECT_TRUE(is_nan_bf16(f32_to_bf16(std::bit_cast<float>(0x7f800001u))));
  EXPECT_TRUE(is_nan_bf16(f32_to_bf16(std::bit_cast<float>(0xffffffffu))));
  EXPECT_EQ(round_to(3.0e38f, DType::BF16), std::bit_cast<float>(0x7f620000u));
}

// f32 -> f16 against both the double model and the F16C instruction, on random floats.
TEST(DtypeF16, RandomAgainstReferences) {
  const std::vector<float> v = random_floats(2'000'000, 1);
  for (float x : v) {
    const uint16_t h = f32_to_f16(x);
    ASSERT_EQ(h, hw_f32_to_f16(x)) << std::hexfloat << x;
    if (std::isnan(x)) continue;
    ASSERT_EQ(bits(f16_to_f32(h)), bits(reference_f16(x))) << std::hexfloat << x;
  }
}

TEST(DtypeBf16, RandomAgainstReference) {
  const std::vector<float> v = random_floats(2'000'000, 2);
  for (float x : v) {
    const uint16_t h = f32_to_bf16(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(is_nan_bf16(h));
      ASSERT_EQ(h >> 15, bits(x) >> 31);  // sign kept
      continue;
    }
    ASSERT_EQ(bits(bf16_to_f32(h)), bits(reference_bf16(x))) << std::hexfloat << x;
  }
}

// The vector paths give the scalar functions' bits exactly, including NaN payloads, and the
// scalar tails work at every length.
TEST(DtypeBulk, MatchesScalar) {
  for (size_t n :
       {size_t(0), size_t(1), size_t(7), size_t(8), size_t(9), size_t(31), size_t(100'003)}) {
    std::vector<float> v = random_floats(n, uint32_t(n + 7));
    for (DType t : {DType::F32, DType::BF16, DType::F16}) {
      const size_t w = size_t(dtype_bits(t) / 8);
      std::vector<std::byte> raw(n * w + 1);
      store_from_f32(v.data(), t, raw.data() + 1, n);  // unaligned on purpose
      std::vector<float> back(n), rounded = v;
      load_to_f32(raw.data() + 1, t, back.data(), n);
      round_inplace(rounded.data(), n, t);
      for (size_t i = 0; i < n; ++i) {
        uint16_t h = 0;
        if (w == 2) std::memcpy(&h, raw.data() + 1 + 2 * i, 2);
        if (t == DType::BF16) {
          ASSERT_EQ(h, f32_to_bf16(v[i])) << i;
        } else if (t == DType::F16) {
          ASSERT_EQ(h, f32_to_f16(v[i])) << i;
        }
        ASSERT_EQ(bits(back[i]), bits(load_as_f32(raw.data() + 1, t, i))) << i;
        ASSERT_EQ(bits(rounded[i]), bits(round_to(v[i], t))) << i;
      }
    }
  }
}

// Decoding every 16-bit pattern in bulk equals the scalar decode.
TEST(DtypeBulk, LoadAllPatterns) {
  std::vector<uint16_t> all(65536);
  for (uint32_t h = 0; h < 65536; ++h) all[h] = uint16_t(h);
  std::vector<float> out(65536);
  for (DType t : {DType::BF16, DType::F16}) {
    load_to_f32(reinterpret_cast<const std::byte*>(all.data()), t, out.data(), all.size());
    for (uint32_t h = 0; h < 65536; ++h) {
      const float s = t == DType::BF16 ? bf16_to_f32(uint16_t(h)) : f16_to_f32(uint16_t(h));
      ASSERT_EQ(bits(out[h]), bits(s)) << std::hex << h;
    }
  }
}

TEST(DtypeBulk, RejectsNonFloat) {
  float x = 1.0f;
  std::byte b[8];
  EXPECT_THROW(store_from_f32(&x, DType::I32, b, 1), std::invalid_argument);
  EXPECT_THROW(load_to_f32(b, DType::U8, &x, 1), std::invalid_argument);
  EXPECT_THROW(round_inplace(&x, 1, DType::F8_E4M3), std::invalid_argument);
}

}  // namespace
}  // namespace nanscope
