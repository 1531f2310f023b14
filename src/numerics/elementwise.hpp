// Elementwise steps that only some families use (Gemma's GELU-tanh and soft-capping, sliding
// windows, the MoE router's sigmoid gate), each as torch computes it on CPU in the run dtype.
// Each has a plain scalar `_ref` twin it is tested against (tests/unit/test_elementwise.cpp).
#pragma once

#include <cstdint>

#include "numerics/dtype.hpp"

namespace nanscope {

// transformers' GELUTanh (torch gelu(approximate="tanh")) of gate times up:
//   act = round(0.5 * g * (1 + tanh(beta * (g + kappa * g^3)))); out = round(act * up)
// in fp32 per element, tanh by SLEEF's tanhf_u10 on whole vectors (std::tanh on the rest).
void gelu_tanh_mul(const float* gate, const float* up, int64_t n, DType dt, float* out);
void gelu_tanh_mul_ref(const float* gate, const float* up, int64_t n, DType dt, float* out);

// Soft-capping in place (Gemma 2's attention scores and final logits):
//   v = round(round(tanh(round(v / cap))) * cap)
void softcap_inplace(float* v, int64_t n, float cap, DType dt);
void softcap_inplace_ref(float* v, int64_t n, float cap, DType dt);

// The elementwise steps of eager attention for row i of the scores s[0, T), with the options
// of every family: peak = max(peak, |s_j|) over finite s_j with j visible (before rounding);
// s = round(round(s) * scaling); soft-capping when cap > 0; then the mask added (rounded) where
// j is not visible: j > i, or j <= i - window when window > 0.
void attention_scores_row_window(float* s, int64_t T, int64_t i, int64_t window, float scaling,
                                 float cap, float mask, DType dt, double& peak);

// Whether key j is masked for query i (causal, and the sliding window when window > 0).
inline bool masked_key(int64_t i, int64_t j, int64_t window) {
  return j > i || (window > 0 && j <= i - window);
}

// out = round(round(1 / (1 + exp(-g))) * x) per row: Qwen2-MoE's shared expert, x [T, H]
// scaled by the sigmoid of its gate g [T].
void sigmoid_scale_rows(const float* g, const float* x, int64_t T, int64_t H, DType dt, float* out);

}  // namespace nanscope
