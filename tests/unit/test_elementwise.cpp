// The family-specific elementwise steps against their scalar references and against the
// functions they approximate (the bit-level proof is the per-site goldens of gemma2-tiny).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "numerics/elementwise.hpp"
#include "numerics/kernels.hpp"

namespace nanscope {
namespace {

std::vector<float> randoms(size_t n, float scale, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

TEST(Elementwise, GeluTanhMulMatchesItsReferenceAndTheFormula) {
  for (DType dt : {DType::F32, DType::BF16, DType::F16})
    for (size_t n : {size_t(1), size_t(31), size_t(64), size_t(100003)}) {
      std::vector<float> g = randoms(n, 3.0f, 1), u = randoms(n, 1.0f, 2);
      round_inplace(g.data(), n, dt);
      round_inplace(u.data(), n, dt);
      std::vector<float> a(n), b(n);
      gelu_tanh_mul(g.data(), u.data(), int64_t(n), dt, a.data());
      gelu_tanh_mul_ref(g.data(), u.data(), int64_t(n), dt, b.data());
      ASSERT_EQ(a, b) << n;
      for (size_t i = 0; i < n; ++i) {  // the tanh approximation of GELU, in double
        const double x = g[i];
        const double gelu =
            0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
        const double want = gelu * u[i];
        // Relative, plus the cancellation in 1 + tanh(.) for large negative x (fp32 epsilon
        // of the terms).
        const double tol = (dt == DType::F32    ? 1e-5
                            : dt == DType::BF16 ? 2e-2
                                                : 2e-3) *
                               (std::fabs(want) + 1e-3) +
                           2e-7 * std::fabs(x * u[i]);
        ASSERT_NEAR(a[i], want, tol) << i << " g=" << g[i];
      }
    }
  const float nan = std::numeric_limits<float>::quiet_NaN(), one = 1.0f;
  float out = 0;
  gelu_tanh_mul(&nan, &one, 1, DType::BF16, &out);
  EXPECT_TRUE(std::isnan(out));
}

TEST(Elementwise, SoftcapBoundsAndMatchesItsReference) {
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    std::vector<float> v = randoms(1000, 40.0f, 3);
    round_inplace(v.data(), v.size(), dt);
    std::vector<float> a = v, b = v;
    softcap_inplace(a.data(), int64_t(a.size()), 5.0f, dt);
    softcap_inplace_ref(b.data(), int64_t(b.size()), 5.0f, dt);
    ASSERT_EQ(a, b);
    for (size_t i = 0; i < v.size(); ++i) {
      EXPECT_LE(std::fabs(a[i]), 5.0f);
      EXPECT_NEAR(a[i], 5.0 * std::tanh(v[i] / 5.0), dt == DType::F32 ? 1e-5 : 5e-2) << v[i];
    }
  }
}

TEST(Elementwise, WindowedScoresMaskOutsideTheWindowAndKeepNaN) {
  const float mask = dtype_lowest(DType::BF16);
  std::vector<float> s = {1, 2, 3, 4, 5, 6};
  double peak = 0;
  attention_scores_row_window(s.data(), 6, 3, 2, 1.0f, 0.0f, mask, DType::BF16, peak);
  EXPECT_EQ(peak, 4.0);  // only keys 2 and 3 are visible to query 3 with a window of 2
  EXPECT_EQ(s[2], 3.0f);
  EXPECT_EQ(s[3], 4.0f);
  for (int j : {0, 1, 4, 5}) EXPECT_LT(s[size_t(j)], -1e38f) << j;
  // A NaN outside the window survives the mask, as in torch.
  std::vector<float> t = {std::numeric_limits<float>::quiet_NaN(), 1, 2};
  attention_scores_row_window(t.data(), 3, 2, 1, 1.0f, 0.0f, mask, DType::BF16, peak);
  EXPECT_TRUE(std::isnan(t[0]));
  EXPECT_TRUE(masked_key(5, 2, 3));
  EXPECT_FALSE(masked_key(5, 3, 3));
  EXPECT_FALSE(masked_key(5, 0, 0));
}

TEST(Elementwise, GemmaRmsNormMultipliesByOnePlusWeightOnce) {
  const int64_t n = 48;
  std::vector<float> x = randoms(size_t(n * 3), 1.0f, 4), w = randoms(size_t(n), 0.1f, 5);
  round_inplace(x.data(), x.size(), DType::BF16);
  round_inplace(w.data(), w.size(), DType::BF16);
  std::vector<float> a(x.size()), b(x.size());
  rmsnorm(x.data(), 3, n, w.data(), 1e-6, DType::BF16, a.data(), true);
  rmsnorm_ref(x.data(), 3, n, w.data(), 1e-6, DType::BF16, b.data(), true);
  EXPECT_EQ(a, b);
  for (int64_t r = 0; r < 3; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[size_t(r * n + i)]) * x[size_t(r * n + i)];
    const double inv = 1.0 / std::sqrt(ss / double(n) + 1e-6);
    for (int64_t i = 0; i < n; ++i) {
      const double want = x[size_t(r * n + i)] * inv * (1.0 + w[size_t(i)]);
      EXPECT_NEAR(a[size_t(r * n + i)], want, 8e-3 * std::fabs(want) + 1e-6);
    }
  }
}

}  // namespace
}  // namespace nanscope
