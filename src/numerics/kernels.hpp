// The numeric kernels of the forward pass, each as transformers computes it on CPU in a run
// dtype `dt` (F32, BF16 or F16). Activations are fp32 arrays whose values are already rounded
// to `dt`; a kernel's output is rounded to `dt` where transformers rounds (docs/forward.md).
//
// Each kernel with a fast path (threads, AVX2) has a plain scalar `_ref` twin it is tested
// against (tests/unit/test_kernels.cpp). Both propagate NaN/inf as IEEE arithmetic does: no
// kernel skips zeros, clamps or flushes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "numerics/dtype.hpp"

namespace nanscope {

// A weight matrix [rows, cols] (Hugging Face [out, in] layout) as stored in the checkpoint,
// read in place (bf16, f16 or f32). Reading it as run dtype `dt` applies the cast transformers
// does at load: the stored value rounded to `dt` (bf16 -> fp16 may overflow to inf).
struct WeightView {
  const std::byte* data = nullptr;
  DType storage = DType::F32;
  int64_t rows = 0, cols = 0;
};

// Element (r, c) as the run dtype sees it.
float weight_at(const WeightView& w, int64_t r, int64_t c, DType dt);
// Rows [row, row + n) converted to fp32 as the run dtype sees them, into out[n * cols].
void weight_rows(const WeightView& w, int64_t row, int64_t n, DType dt, float* out);
// A 1-D parameter (norm weight, bias) of n elements, as the run dtype sees it.
void weight_vector(const std::byte* data, DType storage, int64_t n, DType dt, float* out);

// out[t, r] = round_dt(sum_k x[t, k] * W[r, k] (+ bias[r])) for t < T, r < W.rows: x @ W^T with
// fp32 accumulation and one rounding of the output, as torch's CPU bf16/fp16 GEMM (and addmm
// with bias) does. x is [T, W.cols] row-major; bias (nullable) holds W.rows values already in
// the run dtype. Threaded over output rows; AVX2 converts bf16/f16 weights in registers. The
// kernel (streaming, OpenBLAS, oneDNN, AMX tiles) is choose_linear_path's (numerics/backend.hpp).
void linear(const float* x, int64_t T, const WeightView& w, const float* bias, DType dt,
            float* out);
// Several linear layers of the same input (q/k/v, gate/up): each as linear() computes it, with
// the input prepared once where the kernel repacks it (the AMX path).
struct LinearOutput {
  WeightView w;
  const float* bias;  // nullable
  float* out;
};
void linear_shared_input(const float* x, int64_t T, std::span<const LinearOutput> outs, DType dt);
void linear_ref(const float* x, int64_t T, const WeightView& w, const float* bias, DType dt,
                float* out);

// The MLP's gate and up products and silu_mul in one: act = silu_mul(linear(x, gate),
// linear(x, up)), the same numbers as those three calls. Where choose_linear_path picks the AMX
// kernel (bf16, T >= 32 by default), gate and up are combined block by block while in cache and
// never written.
void linear_silu_mul(const float* x, int64_t T, const LinearOutput& gate, const LinearOutput& up,
                     DType dt, float* act);

// RMSNorm over rows of length n (transformers' Qwen3/Llama RMSNorm):
//   xf = x (fp32); var = mean(xf^2); y = round_dt(xf * (1 / sqrt(var + float(eps))));
//   out = round_dt(weight * y)
// `weight` holds n values already in the run dtype. rows x n, in place allowed.
// offset (Gemma's RMSNorm): out = round_dt(xf * (1 / sqrt(var + eps)) * (1 + weight)), no
// rounding in between.
void rmsnorm(const float* x, int64_t rows, int64_t n, const float* weight, double eps, DType dt,
             float* out, bool offset = false);
void rmsnorm_ref(const float* x, int64_t rows, int64_t n, const float* weight, double eps, DType dt,
                 float* out, bool offset = false);

// Softmax of one row in fp32 (torch's: max, exp(x - max), sum, multiply by 1/sum). A NaN or
// +inf anywhere, or a row of only -inf, gives a row of NaN, as in torch.
void softmax_row(const float* x, int64_t n, float* out);
// The elementwise steps of eager attention on row i of the scores s[0, T) (transformers'
// eager_attention_forward): peak = max(peak, |s_j|) over finite s_j with j <= i (before any
// rounding), then s = round(round(round(s) * scaling) + mask) with mask added where j > i.
void attention_scores_row(float* s, int64_t T, int64_t i, float scaling, float mask, DType dt,
                          double& peak);
void attention_scores_row_ref(float* s, int64_t T, int64_t i, float scaling, float mask, DType dt,
                              double& peak);
void softmax_row_ref(const float* x, int64_t n, float* out);

// out = round_dt(round_dt(silu(gate)) * up), silu(x) = x / (1 + exp(-x)) in fp32.
void silu_mul(const float* gate, const float* up, int64_t n, DType dt, float* out);
void silu_mul_ref(const float* gate, const float* up, int64_t n, DType dt, float* out);

// out = round_dt(a + b) elementwise (the residual connection).
void add_round(const float* a, const float* b, int64_t n, DType dt, float* out);

// torch's Vectorized<float>::exp_u20 (its CPU flash-attention kernel's exp for fp32), lane for
// lane: a degree-5 polynomial on x - n ln2; NaN is taken as the upper clamp bound.
float torch_exp_u20(float x);
// torch's Vectorized<float>::fexp_u20, the exp of its CPU flash-attention kernel for bf16/fp16
// (Malossi et al.: a cubic for 2^frac written into the exponent bits), lane for lane; NaN gives -0.
// Not exp(): its results differ from expf by about 1e-4 relative (mean 5e-5 over [-20, 0]).
float torch_fexp_u20(float x);

// Float lanes of torch's vectors on the machine the goldens were made with (AVX-512): the width of
// its lane-wise reductions (softmax, SDPA's sums).
inline constexpr int64_t kTorchFloatLanes = 16;
// torch's vec_reduce_all for a sum of one vector's lanes: halves, then quarters, pairs,
// neighbours.
float torch_lanes_sum(float (&lanes)[kTorchFloatLanes]);

// Plain fp32 matrix products, row-major with leading dimensions, on OpenBLAS in the calling
// thread (callers parallelise around them): c[M, N] = a[M, K] @ b[N, K]^T (sgemm_nt) or
// a[M, K] @ b[K, N] (sgemm_nn). Every product is computed (no skipping of zeros), so NaN and
// inf propagate as in torch's matmul.
void sgemm_nt(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
              int64_t M, int64_t N, int64_t K);
void sgemm_nn(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
              int64_t M, int64_t N, int64_t K);

// Dot product of two fp32 rows with fp32 accumulation (8 lanes), for attention.
float dot_f32(const float* a, const float* b, int64_t n);

}  // namespace nanscope
