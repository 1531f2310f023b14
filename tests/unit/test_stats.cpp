// The bit-level statistics kernel against the plain per-element reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "numerics/stats.hpp"

using namespace nanscope;

namespace {

std::vector<std::byte> encode(const std::vector<float>& v, DType t) {
  std::vector<std::byte> out(v.size() * size_t(dtype_bits(t) / 8));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::F32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      uint16_t h = t == DType::BF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

void expect_same(const ValueStats& a, const ValueStats& b) {
  EXPECT_EQ(a.count, b.count);
  EXPECT_EQ(a.nan, b.nan);
  EXPECT_EQ(a.inf, b.inf);
  EXPECT_EQ(a.fp16_range, b.fp16_range);
  EXPECT_EQ(a.any_finite, b.any_finite);
  EXPECT_EQ(a.abs_max, b.abs_max);
  EXPECT_EQ(a.min, b.min);
  EXPECT_EQ(a.max, b.max);
}

}  // namespace

class StatsTest : public ::testing::TestWithParam<DType> {};

TEST_P(StatsTest, MatchesReferenceOnRandomDataWithSpecials) {
  const DType t = GetParam();
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int trial = 0; trial < 40; ++trial) {
    const size_t n = 1 + rng() % 5000;
    std::vector<float> v(n);
    const float scale = std::pow(10.0f, float(int(rng() % 12) - 4));  // up to 1e7: fp16 range
    for (auto& x : v) x = normal(rng) * scale;
    const int specials = int(rng() % 4);
    for (int s = 0; s < specials; ++s) {
      const float sv[] = {NAN,      INFINITY,  -INFINITY, -NAN, 65504.0f,
                          65536.0f, -70000.0f, 0.0f,      -0.0f};
      v[rng() % n] = sv[rng() % 9];
    }
    if (trial % 5 == 0)
      for (auto& x : v) x = std::fabs(x);  // one sign only: min comes from the smallest magnitude
    if (trial % 7 == 0)
      for (auto& x : v) x = -std::fabs(x);
    const auto bytes = encode(v, t);
    expect_same(value_stats(bytes.data(), n, t), value_stats_reference(bytes.data(), n, t));
  }
}

TEST_P(StatsTest, AllNonFinite) {
  const DType t = GetParam();
  const auto bytes = encode({NAN, INFINITY, -INFINITY}, t);
  ValueStats s = value_stats(bytes.data(), 3, t);
  EXPECT_EQ(s.nan, 1u);
  EXPECT_EQ(s.inf, 2u);
  EXPECT_FALSE(s.any_finite);
  expect_same(s, value_stats_reference(bytes.data(), 3, t));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, StatsTest, ::testing::Values(DType::F32, DType::BF16, DType::F16),
                         [](const auto& p) { return std::string(dtype_name(p.param)); });

TEST(Stats, Fp16RangeThresholdIsStrictlyAbove65504) {
  const auto bytes = encode({65504.0f, 65504.5f, -65505.0f, 1e30f}, DType::F32);
  ValueStats s = value_stats(bytes.data(), 4, DType::F32);
  EXPECT_EQ(s.fp16_range, 3u);
  const auto b16 = encode({65280.0f, 65536.0f}, DType::BF16);  // neighbours of 65504 in bf16
  EXPECT_EQ(value_stats(b16.data(), 2, DType::BF16).fp16_range, 1u);
}

TEST(Stats, LargeInputCrossesBlocks) {
  std::vector<float> v(3'000'000, 1.0f);
  v[2'999'999] = NAN;
  v[1'048'576] = -5.0f;
  const auto bytes = encode(v, DType::BF16);
  expect_same(value_stats(bytes.data(), v.size(), DType::BF16),
              value_stats_reference(bytes.data(), v.size(), DType::BF16));
}

// hidden's check of what it writes: a stored value is finite exactly when its fp32 value is;
// fp16's overflow (7e4) is not finite once stored. Each non-finite kind at each position of a
// block boundary, in every float dtype.
TEST(AllFiniteStored, AgreesWithTheDecodedValues) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 rng(7);
  std::normal_distribution<float> d(0.0f, 100.0f);
  for (DType t : {DType::F32, DType::BF16, DType::F16}) {
    std::vector<float> v(700);
    for (float& x : v) x = d(rng);
    v[3] = dtype_max(t);
    v[4] = -dtype_max(t);
    EXPECT_TRUE(all_finite_stored(encode(v, t), t)) << dtype_name(t);
    for (size_t at : {size_t(0), size_t(255), size_t(256), size_t(699)})
      for (float bad : {inf, -inf, nan}) {
        std::vector<float> w = v;
        w[at] = bad;
        EXPECT_FALSE(all_finite_stored(encode(w, t), t)) << dtype_name(t) << " at " << at;
      }
  }
  std::vector<float> big(10, 1.0f);
  big[9] = 7e4f;  // past fp16's 65504
  EXPECT_FALSE(all_finite_stored(encode(big, DType::F16), DType::F16));
  EXPECT_TRUE(all_finite_stored(encode(big, DType::BF16), DType::BF16));
  EXPECT_TRUE(all_finite_stored({}, DType::F16));
}
