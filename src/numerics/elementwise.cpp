#pragma GCC optimize("fp-contract=off")

#include "numerics/elementwise.hpp"

#include <immintrin.h>
#include <sleef.h>

#include <cmath>
#include <numbers>

#include "numerics/parallel.hpp"

namespace nanscope {

namespace {
// torch's vectorized loops (cpu_kernel_vec) run whole vectors of 2 x 16 floats (reduced types:
// 2 x 32) and the scalar op on what is left of the array: here SLEEF on the same elements.
int64_t vector_end(int64_t n, DType dt) {
  const int64_t block = dt == DType::F32 ? 32 : 64;
  return n / block * block;
}

inline float sleef_tanhf(float x) {
  return _mm256_cvtss_f32(Sleef_tanhf8_u10avx2(_mm256_set1_ps(x)));
}

// The constants of torch's GeluKernel (tanh approximation) in float.
const float kBeta = float(std::numbers::sqrt2 * (2.0 / std::sqrt(std::numbers::pi)) * 0.5);
const float kKappa = 0.044715f;

inline float gelu_tanh(float x, bool vec) {
  const float cube = x * x * x;
  const float inner = kBeta * (x + kKappa * cube);
  return 0.5f * x * (1.0f + (vec ? sleef_tanhf(inner) : std::tanh(inner)));
}
}  // namespace

void gelu_tanh_mul(const float* gate, const float* up, int64_t n, DType dt, float* out) {
  const int64_t vend = vector_end(n, dt);
  parallel_for(n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      out[i] = round_to(round_to(gelu_tanh(gate[i], i < vend), dt) * up[i], dt);
  });
}

void gelu_tanh_mul_ref(const float* gate, const float* up, int64_t n, DType dt, float* out) {
  const int64_t vend = vector_end(n, dt);
  for (int64_t i = 0; i < n; ++i) {
    const float a = round_to(gelu_tanh(gate[i], i < vend), dt);
    out[i] = round_to(a * up[i], dt);
  }
}

void softcap_inplace(float* v, int64_t n, float cap, DType dt) {
  const int64_t vend = vector_end(n, dt);
  parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float d = round_to(v[i] / cap, dt);
      const float t = round_to(i < vend ? sleef_tanhf(d) : std::tanh(d), dt);
      v[i] = round_to(t * cap, dt);
    }
  });
}

void softcap_inplace_ref(float* v, int64_t n, float cap, DType dt) {
  const int64_t vend = vector_end(n, dt);
  for (int64_t i = 0; i < n; ++i) v[i] = round_to(v[i] / cap, dt);
  for (int64_t i = 0; i < n; ++i)
    v[i] = round_to(i < vend ? sleef_tanhf(v[i]) : std::tanh(v[i]), dt);
  for (int64_t i = 0; i < n; ++i) v[i] = round_to(v[i] * cap, dt);
}

void attention_scores_row_window(float* s, int64_t T, int64_t i, int64_t window, float scaling,
                                 float cap, float mask, DType dt, double& peak) {
  for (int64_t j = 0; j < T; ++j) {
    const bool m = masked_key(i, j, window);
    if (!m && std::isfinite(s[j])) peak = std::max(peak, double(std::fabs(s[j])));
    float x = round_to(round_to(s[j], dt) * scaling, dt);
    if (cap > 0) {  // the row is a whole vector's worth or the tail: tanh as softcap_inplace
      x = round_to(x / cap, dt);
      x = round_to(sleef_tanhf(x), dt);
      x = round_to(x * cap, dt);
    }
    if (m) x = round_to(x + mask, dt);
    s[j] = x;
  }
}

void sigmoid_scale_rows(const float* g, const float* x, int64_t T, int64_t H, DType dt,
                        float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const float sg = round_to(1.0f / (1.0f + std::exp(-g[t])), dt);
    for (int64_t h = 0; h < H; ++h) out[t * H + h] = round_to(sg * x[t * H + h], dt);
  }
}

}  // namespace nanscope
