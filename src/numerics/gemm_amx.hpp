// bf16 linear layers on Intel AMX tiles (Sapphire Rapids and later), written for nanscope's
// batched bf16 runs (`nanscope hidden`): out = round_bf16(x @ W^T + bias), read from and written
// to the fp32 activation arrays directly.
//
// Why our own kernel and not only oneDNN: Debian 12's oneDNN 2.6 reached 2.7-4.8 TFLOP/s on the
// decoder's shapes on the 16-core Xeon, and on top of it every product needed a pass converting
// the activations to bf16, a reorder of the weights and a pass widening the bf16 result back to
// fp32 (bench_gemm, docs/forward.md). Here each worker packs the panel of weights it multiplies
// into the tiles' pair-interleaved layout in its own buffer, the activations are narrowed once
// (once for q/k/v together, once for gate/up), and bias, rounding and widening happen while each
// finished block is still in cache (for gate/up, SiLU and the product too: linear_pair). The
// blocks are shared out with work stealing. Eager attention's q.k^T and p.v use the same tiles
// (matmul_nt / matmul_nn / matmul_packed). Figures: BENCHMARKS.md, session 4: 4.4-6.0 TFLOP/s on
// the decoder's shapes at 4096 rows.
//
// Numerics: TDPBF16PS multiplies bf16 pairs exactly and accumulates in fp32 (the order is the
// kernel's, as with any BLAS), treating bf16 subnormal inputs as zero, as oneDNN's AMX and
// AVX512-BF16 kernels inside torch do; bias added in fp32, one rounding to bf16 (round to
// nearest even) = torch's bf16 addmm.
//
// The same blocking runs on an emulation of the tiles in plain C++ (`emulated`), which is how
// the layout, padding and blocking are tested on machines without AMX.
//
// Which tiles run (the processor's, the emulation) is amx_tiles() of numerics/backend.hpp, where
// the callers' choice of the AMX path is made too (choose_linear_path, choose_attention_path);
// the blocking is backend().amx_tuning.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "numerics/backend.hpp"

namespace nanscope::gemm_amx {

// Whether the AMX paths are in use under backend(): the processor has AMX-BF16 (and Linux granted
// the tile state) and the options allow it, or the options ask for emulated tiles (AmxUse::
// Emulated, NANSCOPE_AMX_EMULATE=1, or a forced AmxEmulated path: slow, for tests).
bool available();

// out[M, N] (fp32 row-major, every value a bf16 value) = round_bf16(x[M, K] @ w[N, K]^T + bias),
// x fp32 row-major holding bf16 values (narrowed with round to nearest even otherwise), w bf16 bit
// patterns row-major as checkpoints store linear weights, bias nullable (N fp32). Uses the
// process's parallel_for workers. Requires available().
void linear(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,
            float* out);

// Single-threaded products for eager attention (called inside the caller's parallel loop), on
// fp32 arrays holding bf16 values, fp32 results not rounded: c[M, N] = a[M, K] @ b[N, K]^T
// (matmul_nt, q @ k^T) or a[M, K] @ b[K, N] (matmul_nn, p @ v), leading dimensions in elements.
// Same contract as sgemm_nt / sgemm_nn of kernels.hpp with bf16 products (subnormals as zero).
// Requires available().
void matmul_nt(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
               int64_t M, int64_t N, int64_t K);
void matmul_nn(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
               int64_t M, int64_t N, int64_t K);

// The same with the right-hand side packed once for several products (k and v of one sequence
// and head, for every block of query rows): pack_rows_n from b holding N rows of K (k),
// pack_rows_k from b holding K rows of N (v); then matmul_packed(a, lda, M, b, c, ldc).
struct PackedB {
  int64_t N = 0, K = 0, nt = 0, kt = 0;
  std::vector<uint16_t> tiles;
};
void pack_rows_n(const float* b, int64_t ldb, int64_t N, int64_t K, PackedB& out);
void pack_rows_k(const float* b, int64_t ldb, int64_t K, int64_t N, PackedB& out);
void matmul_packed(const float* a, int64_t lda, int64_t M, const PackedB& b, float* c, int64_t ldc);

// Several products of the same input (q/k/v, gate/up): the input is narrowed and packed once.
struct LinearJob {
  const uint16_t* w;  // [N, K] bf16
  int64_t N;
  const float* bias;  // nullable
  float* out;         // [M, N]
};
void linear_many(const float* x, int64_t M, int64_t K, std::span<const LinearJob> jobs);

// Two products of the same input with weights of the same shape (gate and up), combined while
// each block is in cache: for every block of rows [m0, m1) x columns [n0, n1) of the outputs,
// done(c0, c1, ldc, m0, m1, n0, n1) gets the fp32 sums of x @ w0^T and x @ w1^T (no bias, not
// rounded; element (m, n) at (m - m0) * ldc + (n - n0)). Called from the workers, each block
// once. Requires available().
using PairDone = std::function<void(const float* c0, const float* c1, int64_t ldc, int64_t m0,
                                    int64_t m1, int64_t n0, int64_t n1)>;
void linear_pair(const float* x, int64_t M, int64_t K, const uint16_t* w0, const uint16_t* w1,
                 int64_t N, const PairDone& done);

// The same computation with the tiles emulated in C++ whatever backend() says (slow; for tests on
// any x86-64 machine).
void linear_emulated(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N,
                     const float* bias, float* out);

// Benchmark aid (bench_gemm --peak): what the tile units of this machine deliver with every
// worker busy, in GFLOP/s: `products` runs the kernel's four tile products per step on tiles
// already loaded; `with_loads` adds its four tile loads per step, from 4 KB that stay in L1.
// The ceiling any kernel here can reach. Requires available().
struct Peak {
  double products = 0, with_loads = 0;
};
Peak peak(int64_t steps_per_thread = 1 << 20);

}  // namespace nanscope::gemm_amx
