// Every fast kernel against its scalar reference, with a tolerance per run dtype, and NaN/inf
// propagation checked element by element.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <vector>

#include "common/error.hpp"
#include "model/rope.hpp"
#include "numerics/backend.hpp"
#include "numerics/gemm_amx.hpp"
#include "numerics/kernels.hpp"
#include "numerics/stats.hpp"

namespace nanscope {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// A weight matrix stored in `storage` bytes.
struct Stored {
  std::vector<std::byte> bytes;
  WeightView view;
};

Stored make_weight(const std::vector<float>& w, int64_t rows, int64_t cols, DType storage) {
  Stored s;
  s.bytes.resize(w.size() * (storage == DType::F32 ? 4 : 2));
  store_from_f32(w.data(), storage, s.bytes.data(), w.size());
  s.view = WeightView{s.bytes.data(), storage, rows, cols};
  return s;
}

std::vector<float> random_vec(size_t n, std::mt19937& rng, float scale, DType round) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& f : v) f = round_to(d(rng), round);
  return v;
}

// One unit in the last place of the run dtype at |x| (fp32: 2^-23 relative).
double ulp(double x, DType dt) {
  const int mant = dt == DType::BF16 ? 7 : dt == DType::F16 ? 10 : 23;
  int e;
  std::frexp(std::max(std::fabs(x), 1e-30), &e);
  return std::ldexp(1.0, e - 1 - mant);
}

const DType kRun[] = {DType::F32, DType::BF16, DType::F16};
const DType kStorage[] = {DType::F32, DType::BF16, DType::F16};

// T < 16: the streaming microkernel; 16 <= T: OpenBLAS sgemm on widened weights; bf16 with
// T >= 32 on a processor with a oneDNN bf16 kernel (AMX, AVX512-BF16): oneDNN (with the bias
// added inside it).
TEST(Kernels, LinearFastMatchesScalarReference) {
  std::mt19937 rng(7);
  for (DType storage : kStorage)
    for (DType dt : kRun)
      for (int64_t T : {1, 2, 3, 5, 17, 40})
        for (auto [rows, cols] : {std::pair<int64_t, int64_t>{13, 37}, {64, 64}, {9, 128}}) {
          auto w = random_vec(size_t(rows * cols), rng, 0.5f, storage);
          auto x = random_vec(size_t(T * cols), rng, 1.0f, dt);
          auto b = random_vec(size_t(rows), rng, 0.1f, dt);
          Stored s = make_weight(w, rows, cols, storage);
          for (bool with_bias : {false, true}) {
            std::vector<float> fast(size_t(T * rows)), ref(fast.size());
            const float* bp = with_bias ? b.data() : nullptr;
            linear(x.data(), T, s.view, bp, dt, fast.data());
            linear_ref(x.data(), T, s.view, bp, dt, ref.data());
            for (int64_t t = 0; t < T; ++t)
              for (int64_t r = 0; r < rows; ++r) {
                // Accumulation order differs: allow the fp32 error of the sum, and one ulp of
                // the run dtype when that error flips the rounding.
                double mag = 0;
                for (int64_t k = 0; k < cols; ++k)
                  mag += std::fabs(x[size_t(t * cols + k)] * weight_at(s.view, r, k, dt));
                const size_t i = size_t(t * rows + r);
                const double tol = 1e-6 * mag + (dt == DType::F32 ? 0.0 : ulp(ref[i], dt));
                ASSERT_LE(std::fabs(fast[i] - ref[i]), tol)
                    << dtype_name(storage) << "->" << dtype_name(dt) << " T=" << T << " r=" << r;
                ASSERT_EQ(round_to(fast[i], dt), fast[i]) << "output not rounded to the dtype";
              }
          }
        }
}

// The AMX kernel's packing, padding and blocking (shapes that are not multiples of the 32-row,
// 32-column micro blocks or of the 128 x 128 x 256 blocks) on emulated tiles, on any processor;
// the real tiles too where the processor has AMX. Reference: the sum in double, rounded once.
TEST(Kernels, AmxLinearMatchesDoubleReference) {
  std::mt19937 rng(11);
  struct Shape {
    int64_t M, K, N;
  };
  for (Shape sh : {Shape{1, 32, 32}, Shape{37, 70, 50}, Shape{64, 64, 64}, Shape{160, 600, 140},
                   Shape{33, 8, 3}}) {
    const int64_t M = sh.M, K = sh.K, N = sh.N;
    auto w = random_vec(size_t(N * K), rng, 0.5f, DType::BF16);
    auto x = random_vec(size_t(M * K), rng, 1.0f, DType::BF16);
    auto b = random_vec(size_t(N), rng, 0.1f, DType::BF16);
    std::vector<uint16_t> wb(w.size());
    store_from_f32(w.data(), DType::BF16, reinterpret_cast<std::byte*>(wb.data()), w.size());
    for (bool with_bias : {false, true}) {
      const float* bp = with_bias ? b.data() : nullptr;
      std::vector<std::pair<const char*, decltype(&gemm_amx::linear)>> impls = {
          {"emulated", &gemm_amx::linear_emulated}};
      if (gemm_amx::available()) impls.push_back({"amx", &gemm_amx::linear});
      for (auto [name, fn] : impls) {
        std::vector<float> out(size_t(M * N), kNaN);
        fn(x.data(), M, K, wb.data(), N, bp, out.data());
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double sum = 0, mag = 0;
            for (int64_t k = 0; k < K; ++k) {
              const double p = double(x[size_t(m * K + k)]) * w[size_t(n * K + k)];
              sum += p;
              mag += std::fabs(p);
            }
            const float ref = round_bf16(float(sum + (bp ? bp[n] : 0.0)));
            const float got = out[size_t(m * N + n)];
            ASSERT_LE(std::fabs(double(got) - ref), 1e-6 * mag + ulp(ref, DType::BF16))
                << name << " M=" << M << " K=" << K << " N=" << N << " at " << m << "," << n;
            ASSERT_EQ(round_bf16(got), got) << name << ": output not a bf16 value";
          }
      }
    }
  }
}

// The fused MLP step against its three separate steps, bit for bit: with AMX (every machine under
// NANSCOPE_AMX_EMULATE=1, the amx_emulated test; every path in-process: test_backend.cpp) gate
// and up are combined block by block, with
// the bias, the roundings and torch's split between SLEEF and expf at the array's tail; shapes
// with several blocks, odd widths (scalar columns) and T * N not a multiple of 8.
TEST(Kernels, LinearSiluMulMatchesSeparateSteps) {
  std::mt19937 rng(5);
  struct Shape {
    int64_t T, K, N;
  };
  for (Shape sh : {Shape{40, 64, 200}, Shape{161, 96, 131}, Shape{33, 40, 9}, Shape{5, 32, 16}}) {
    for (bool with_bias : {false, true}) {
      auto make_w = [&](std::vector<uint16_t>& bits) {
        auto w = random_vec(size_t(sh.N * sh.K), rng, 0.3f, DType::BF16);
        bits.resize(w.size());
        store_from_f32(w.data(), DType::BF16, reinterpret_cast<std::byte*>(bits.data()), w.size());
        return WeightView{reinterpret_cast<const std::byte*>(bits.data()), DType::BF16, sh.N, sh.K};
      };
      std::vector<uint16_t> gbits, ubits;
      const WeightView wg = make_w(gbits), wu = make_w(ubits);
      auto x = random_vec(size_t(sh.T * sh.K), rng, 1.0f, DType::BF16);
      auto bg = random_vec(size_t(sh.N), rng, 0.5f, DType::BF16);
      auto bu = random_vec(size_t(sh.N), rng, 0.5f, DType::BF16);
      const float* pg = with_bias ? bg.data() : nullptr;
      const float* pu = with_bias ? bu.data() : nullptr;
      std::vector<float> g(size_t(sh.T * sh.N)), u(g.size()), want(g.size()), got(g.size(), kNaN);
      linear(x.data(), sh.T, wg, pg, DType::BF16, g.data());
      linear(x.data(), sh.T, wu, pu, DType::BF16, u.data());
      silu_mul(g.data(), u.data(), int64_t(g.size()), DType::BF16, want.data());
      linear_silu_mul(x.data(), sh.T, {wg, pg, nullptr}, {wu, pu, nullptr}, DType::BF16,
                      got.data());
      for (size_t i = 0; i < want.size(); ++i)
        ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
            << "T " << sh.T << " N " << sh.N << " bias " << with_bias << " element " << i;
    }
  }
}

// The attention products on tiles against sgemm on the same bf16 values: the products are exact,
// so only the fp32 accumulation order differs. On the processor's tiles where AMX is in use, else
// on emulated ones (forced in-process: numerics/backend.hpp).
TEST(Kernels, AmxAttentionProductsMatchSgemm) {
  Backend emulated = backend();
  emulated.force = MatmulPath::AmxEmulated;
  std::optional<ScopedBackend> scoped;
  if (!gemm_amx::available()) scoped.emplace(emulated);
  std::mt19937 rng(17);
  struct Shape {
    int64_t M, N, K;
  };
  for (Shape sh : {Shape{37, 50, 70}, Shape{64, 128, 128}, Shape{1, 3, 5}}) {
    const int64_t M = sh.M, N = sh.N, K = sh.K, lda = K + 3, ldc = N + 5;
    auto a = random_vec(size_t(M * lda), rng, 1.0f, DType::BF16);
    auto bt = random_vec(size_t(N * (K + 1)), rng, 1.0f, DType::BF16);  // [N, K], ld K + 1
    auto bn = random_vec(size_t(K * (N + 2)), rng, 1.0f, DType::BF16);  // [K, N], ld N + 2
    a[size_t(2 % M * lda + 1)] = kNaN;  // row 2 % M: NaN in every output of that row
    for (bool nt : {true, false}) {
      std::vector<float> got(size_t(M * ldc), -1.0f), ref(got.size(), -1.0f);
      if (nt) {
        gemm_amx::matmul_nt(a.data(), lda, bt.data(), K + 1, got.data(), ldc, M, N, K);
        sgemm_nt(a.data(), lda, bt.data(), K + 1, ref.data(), ldc, M, N, K);
      } else {
        gemm_amx::matmul_nn(a.data(), lda, bn.data(), N + 2, got.data(), ldc, M, N, K);
        sgemm_nn(a.data(), lda, bn.data(), N + 2, ref.data(), ldc, M, N, K);
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < ldc; ++n) {
          const float g = got[size_t(m * ldc + n)], r = ref[size_t(m * ldc + n)];
          if (n >= N) {
            ASSERT_EQ(g, -1.0f) << "wrote past column N";
          } else if (m == 2 % M) {
            ASSERT_TRUE(std::isnan(g)) << m << "," << n;
          } else {
            ASSERT_NEAR(g, r, 1e-5f * (1.0f + std::fabs(r)))
                << (nt ? "nt " : "nn ") << m << "," << n;
          }
        }
    }
  }
}

TEST(Kernels, LinearPropagatesNaNAndInfFromWeights) {
  std::mt19937 rng(3);
  for (DType storage : kStorage)
    for (DType dt : kRun) {
      for (int64_t T : {3, 40}) {
        const int64_t rows = 11, cols = 40;
        auto w = random_vec(size_t(rows * cols), rng, 0.5f, storage);
        w[size_t(4 * cols + 17)] = kNaN;  // row 4: every token's output must be NaN
        w[size_t(7 * cols + 39)] = kInf;  // row 7 (in the scalar tail): non-finite
        auto x = random_vec(size_t(T * cols), rng, 1.0f, dt);
        x[size_t(1 * cols + 17)] = 0.0f;  // 0 * NaN is still NaN: no zero skipping
        Stored s = make_weight(w, rows, cols, storage);
        for (auto* fn : {&linear, &linear_ref}) {
          std::vector<float> out(size_t(T * rows));
          fn(x.data(), T, s.view, nullptr, dt, out.data());
          for (int64_t t = 0; t < T; ++t)
            for (int64_t r = 0; r < rows; ++r) {
              const float v = out[size_t(t * rows + r)];
              if (r == 4) {
                EXPECT_TRUE(std::isnan(v)) << "t=" << t;
              } else if (r == 7) {
                EXPECT_FALSE(std::isfinite(v)) << "t=" << t;
              } else {
                EXPECT_TRUE(std::isfinite(v)) << "t=" << t << " r=" << r;
              }
            }
        }
      }
    }
}

TEST(Kernels, WeightCastAtLoadOverflowsToInfInFp16) {
  // A bf16 checkpoint run in fp16: transformers casts the weights, 7e4 > 65504 becomes inf.
  std::vector<float> w = {7.0e4f, -7.0e4f, 1.0f, 65504.0f, 65520.0f, 1e-9f, kNaN, 0.1f};
  Stored s = make_weight(w, 1, 8, DType::BF16);
  std::vector<float> out(8);
  weight_rows(s.view, 0, 1, DType::F16, out.data());
  EXPECT_EQ(out[0], kInf);
  EXPECT_EQ(out[1], -kInf);
  EXPECT_EQ(out[2], 1.0f);
  EXPECT_EQ(out[5], 0.0f);  // below fp16's subnormals
  EXPECT_TRUE(std::isnan(out[6]));
  for (int i = 0; i < 8; ++i) {
    const float scalar = weight_at(s.view, 0, i, DType::F16);
    if (std::isnan(scalar)) {
      EXPECT_TRUE(std::isnan(out[size_t(i)]));
    } else {
      EXPECT_EQ(scalar, out[size_t(i)]) << i;
    }
  }
  // fp32 storage run in bf16 rounds each weight to nearest even; in fp32 it is exact.
  Stored f = make_weight({1.00390625f, 1.01171875f, 3.0e38f, kNaN, -0.0f, 1e-40f, 2.5f, 7.0f}, 1, 8,
                         DType::F32);
  weight_rows(f.view, 0, 1, DType::BF16, out.data());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 1.015625f);
  EXPECT_TRUE(std::isnan(out[3]));
  for (int i = 0; i < 8; ++i) {
    const float scalar = weight_at(f.view, 0, i, DType::BF16);
    if (!std::isnan(scalar)) {
      EXPECT_EQ(std::bit_cast<uint32_t>(scalar), std::bit_cast<uint32_t>(out[size_t(i)])) << i;
    }
  }
}

TEST(Kernels, RmsNormFastMatchesReference) {
  std::mt19937 rng(11);
  for (DType dt : kRun)
    for (int64_t n : {16, 37, 64, 2560}) {
      const int64_t rows = 5;
      auto x = random_vec(size_t(rows * n), rng, 3.0f, dt);
      auto w = random_vec(size_t(n), rng, 1.0f, dt);
      std::vector<float> fast(x.size()), ref(x.size());
      rmsnorm(x.data(), rows, n, w.data(), 1e-6, dt, fast.data());
      rmsnorm_ref(x.data(), rows, n, w.data(), 1e-6, dt, ref.data());
      for (size_t i = 0; i < x.size(); ++i) {
        // Two roundings: y = round(x * r) may differ by one ulp, then weight * y rounds again.
        const double wi = std::fabs(w[i % size_t(n)]);
        const double tol = dt == DType::F32
                               ? 1e-6 * std::fabs(ref[i])
                               : ulp(ref[i], dt) + wi * ulp(std::fabs(ref[i]) / wi, dt);
        ASSERT_LE(std::fabs(fast[i] - ref[i]), tol) << i;
      }
    }
  // A NaN or inf in a row poisons that row only.
  std::vector<float> x(3 * 8, 1.0f), w(8, 1.0f), out(x.size());
  x[3] = kNaN;
  x[8 + 5] = kInf;
  rmsnorm(x.data(), 3, 8, w.data(), 1e-6, DType::BF16, out.data());
  for (int i = 0; i < 8; ++i) EXPECT_TRUE(std::isnan(out[size_t(i)]));
  // An inf makes the variance inf and 1/sqrt of it 0: the row becomes 0, the inf itself NaN.
  for (int i = 8; i < 16; ++i) {
    if (i == 13) {
      EXPECT_TRUE(std::isnan(out[size_t(i)]));
    } else {
      EXPECT_EQ(out[size_t(i)], 0.0f);
    }
  }
  for (int i = 16; i < 24; ++i) EXPECT_EQ(out[size_t(i)], 1.0f);
}

TEST(Kernels, SoftmaxMatchesReferenceAndTorchNaNRules) {
  std::mt19937 rng(5);
  for (int64_t n : {1, 7, 64}) {
    auto x = random_vec(size_t(n), rng, 4.0f, DType::F32);
    if (n > 1) x[0] = -kInf;
    std::vector<float> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
    softmax_row(x.data(), n, a.data());
    softmax_row_ref(x.data(), n, b.data());
    for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(a[size_t(i)], b[size_t(i)], 1e-7);
  }
  auto check_all_nan = [](std::vector<float> x) {
    std::vector<float> a(x.size()), b(x.size());
    softmax_row(x.data(), int64_t(x.size()), a.data());
    softmax_row_ref(x.data(), int64_t(x.size()), b.data());
    for (size_t i = 0; i < x.size(); ++i) {
      EXPECT_TRUE(std::isnan(a[i])) << i;
      EXPECT_TRUE(std::isnan(b[i])) << i;
    }
  };
  check_all_nan({1.0f, kNaN, 2.0f});
  check_all_nan({1.0f, kInf, 2.0f});
  check_all_nan({-kInf, -kInf});
  std::vector<float> x = {0.0f, -kInf, 0.0f}, p(3);
  softmax_row(x.data(), 3, p.data());
  EXPECT_EQ(p[1], 0.0f);
  EXPECT_EQ(p[0], 0.5f);
}

TEST(Kernels, AttentionScoresRowMatchesReference) {
  std::mt19937 rng(13);
  for (DType dt : kRun)
    for (int64_t T : {1, 5, 8, 37, 128})
      for (int64_t i : {int64_t(0), T / 2, T - 1}) {
        auto s = random_vec(size_t(T), rng, 30.0f, DType::F32);
        if (T > 5) s[3] = kNaN, s[4] = kInf, s[T - 1] = -kInf;
        if (T > 2) s[1] = 7e4f;  // beyond fp16's range once rounded
        std::vector<float> a = s, b = s;
        double pa = 0.5, pb = 0.5;
        const float mask = dtype_lowest(dt);
        attention_scores_row(a.data(), T, i, 0.125f, mask, dt, pa);
        attention_scores_row_ref(b.data(), T, i, 0.125f, mask, dt, pb);
        EXPECT_EQ(pa, pb) << dtype_name(dt) << " T=" << T << " i=" << i;
        for (int64_t j = 0; j < T; ++j) {
          if (std::isnan(b[size_t(j)]))
            EXPECT_TRUE(std::isnan(a[size_t(j)])) << j;
          else
            EXPECT_EQ(a[size_t(j)], b[size_t(j)]) << dtype_name(dt) << " T=" << T << " j=" << j;
        }
      }
}

TEST(Kernels, SiluMulMatchesReference) {
  std::mt19937 rng(9);
  for (DType dt : kRun) {
    auto g = random_vec(10000, rng, 4.0f, dt), u = random_vec(10000, rng, 2.0f, dt);
    g[5] = kNaN;
    g[6] = kInf;
    g[7] = -kInf;
    u[8] = kInf;
    std::vector<float> a(g.size()), b(g.size());
    silu_mul(g.data(), u.data(), int64_t(g.size()), dt, a.data());
    silu_mul_ref(g.data(), u.data(), int64_t(g.size()), dt, b.data());
    for (size_t i = 0; i < g.size(); ++i) {
      if (std::isnan(b[i])) {
        EXPECT_TRUE(std::isnan(a[i])) << i;
      } else {
        EXPECT_EQ(a[i], b[i]) << i;
      }
    }
    EXPECT_TRUE(std::isnan(a[5]));
    EXPECT_FALSE(std::isfinite(a[6]));  // silu(inf) = inf
    EXPECT_TRUE(std::isnan(a[7]));      // silu(-inf) = -inf / inf = NaN, as in torch
  }
  // fp16 overflow of the product: 300 * 300 > 65504.
  float g = 300.0f, u = 300.0f, out;
  silu_mul(&g, &u, 1, DType::F16, &out);
  EXPECT_EQ(out, kInf);
}

TEST(Kernels, ActivationStatsCountPerElement) {  // value_stats over fp32 activations
  std::vector<float> v = {1.0f, -3.0f, kNaN, kInf, -kInf, 2.0f};
  const ValueStats s = value_stats(v);
  EXPECT_EQ(s.nan, 1u);
  EXPECT_EQ(s.inf, 2u);
  EXPECT_FALSE(s.finite());
  EXPECT_EQ(s.min, -3.0f);
  EXPECT_EQ(s.max, 2.0f);
  EXPECT_EQ(s.abs_max, 3.0f);
  EXPECT_TRUE(value_stats(std::span<const float>(v).first(2)).finite());
}

ModelConfig rope_config(const std::string& type) {
  ModelConfig c;
  c.model_type = "llama";
  c.head_dim = 16;
  c.max_position_embeddings = 16;
  c.rope.type = type;
  c.rope.theta = 10000.0;
  c.rope.factor = 2.0;
  return c;
}

TEST(Rope, DefaultAndLinearInverseFrequencies) {
  const ModelConfig c = rope_config("default");
  RopeParameters p = rope_parameters(c, 8);
  ASSERT_EQ(p.inv_freq.size(), 8u);
  for (int j = 0; j < 8; ++j)
    EXPECT_EQ(p.inv_freq[size_t(j)], 1.0f / float(std::pow(10000.0, double(float(2 * j) / 16.0f))));
  RopeParameters lin = rope_parameters(rope_config("linear"), 8);
  for (int j = 0; j < 8; ++j) EXPECT_EQ(lin.inv_freq[size_t(j)], p.inv_freq[size_t(j)] / 2.0f);
  // dynamic: unchanged up to max_position_embeddings, a larger base above it.
  RopeParameters dyn = rope_parameters(rope_config("dynamic"), 16);
  EXPECT_EQ(dyn.inv_freq, p.inv_freq);
  RopeParameters dyn24 = rope_parameters(rope_config("dynamic"), 24);
  EXPECT_EQ(dyn24.inv_freq[0], 1.0f);
  EXPECT_LT(dyn24.inv_freq[7], p.inv_freq[7]);
}

TEST(Rope, UnknownTypeIsAnInputErrorNamingIt) {
  try {
    rope_parameters(rope_config("longrope"), 8);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("longrope"), std::string::npos);
  }
}

TEST(Rope, TablesAreRoundedAndRotateHalves) {
  const ModelConfig c = rope_config("default");
  RopeTables tab = rope_tables(c, 4, DType::BF16);
  for (float v : tab.cos) EXPECT_EQ(round_bf16(v), v);
  // position 0: identity.
  std::vector<float> x(16);
  for (int i = 0; i < 16; ++i) x[size_t(i)] = float(i + 1);
  std::vector<float> y = x;
  apply_rope(y.data(), 1, 1, tab, DType::BF16);
  EXPECT_EQ(y, x);
}

}  // namespace
}  // namespace nanscope
