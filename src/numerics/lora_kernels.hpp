// The per-row arithmetic of a LoRA merge (tools/merge.cpp): B@A a row at a time with fused
// multiply-adds in k order, so that it agrees with torch's B @ A bit for bit, the fidelity sums
// of the stored values, and an AVX2 kernel doing both for the common case in one pass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "numerics/dtype.hpp"

namespace nanscope {

// A LoRA update as row products: dW[i, :] = fl(fl(L[i, :] @ R) * scale).
struct LowRankFactors {
  std::vector<float> L, R;  // [rows, r], [r, cols]
  int64_t r = 0;
  float scale = 0;
};

// With W0 the base values, S the ideal fp32 result and R = S as stored, over the elements the
// update changed (S != W0, both finite): the sums behind kept / projected / relative_error.
struct FidelitySums {
  double num = 0, den = 0;  // sum (R - W0)^2, sum (S - W0)^2
  double dot = 0, err = 0;  // sum (R - W0)(S - W0), sum (R - S)^2
  uint64_t lost = 0, updated = 0, nonfinite = 0, base_nonfinite = 0;
  uint64_t ideal_nonfinite = 0;  // elements whose fp32 result W + dW is itself NaN/inf
  void add(const FidelitySums& o) {
    num += o.num, den += o.den, lost += o.lost, updated += o.updated, nonfinite += o.nonfinite;
    dot += o.dot, err += o.err;
    base_nonfinite += o.base_nonfinite;
    ideal_nonfinite += o.ideal_nonfinite;
  }
};

// out[j] = sum_k Lrow[k] * R[k, j] for j < cols, k in order, each step one fused multiply-add.
void lowrank_row(const float* Lrow, const float* R, int64_t r, int64_t cols, float* out);

// Adds one row's elements to st: w0 the base values, s the ideal fp32 result, r = s as stored.
// The sums come out the same whether a row is fed in one go or by the fused kernel below.
void row_stats(const float* w0, const float* s, const float* r, int64_t n, FidelitySums& st);

// Rows [i0, i1) of W' = round(W + fl(fl(L@R) * scale)) from the source bytes (cols columns,
// dtype src) into out (row i0 first, dtype out), adding their fidelity sums to st.
using FusedRows = void (*)(const std::byte* src, const LowRankFactors& p, int64_t cols, int64_t i0,
                           int64_t i1, std::byte* out, FidelitySums& st);
// The one-pass kernel for one plain LoRA and cols % 8 == 0; nullptr where the machine or the
// dtypes have none (the caller then runs lowrank_row + row_stats).
FusedRows fused_lora_kernel(DType src, DType out);

}  // namespace nanscope
