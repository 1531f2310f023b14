// bf16 x bf16 -> fp32 matrix products through oneDNN (Debian's libdnnl), the library torch's
// CPU bf16 linear layers call too. Used for the compute-bound case of bf16 runs: many tokens
// at once (nanscope hidden batches). oneDNN picks the best kernel the processor has (Intel AMX
// tiles, AVX512-BF16 dot products); where it only has its reference implementation (e.g. an
// AVX2-only machine) `available()` is false and callers keep the fp32 OpenBLAS path. Whether a
// product runs here is decided by choose_linear_path (numerics/backend.hpp).
//
// Numerics: products of bf16 values accumulated in fp32 (order chosen by the kernel, as in
// torch), no rounding of the output here. AMX and AVX512-BF16 flush bf16 subnormal inputs to
// zero, as they do inside torch.
#pragma once

#include <cstdint>
#include <string>

namespace nanscope::gemm_bf16 {

// Whether a non-reference oneDNN bf16 matmul exists on this machine (decided once, whatever the
// options say: backend.hpp's has_onednn_bf16).
bool available();
// The oneDNN implementation used ("brg:avx512_core_amx", ...) or why none is ("unavailable: ...").
std::string implementation();

// c[M, N] = a[M, K] @ w[N, K]^T, a and w bf16 bit patterns (row-major), c fp32 row-major.
// Runs on oneDNN's own threads; call from one thread at a time. Requires available().
void matmul(const uint16_t* a, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* c);

// The same product plus bias (nullable, N fp32 values), rounded once to bf16 (round to
// nearest even) into c[M, N] bf16: round(acc + bias), what torch's bf16 addmm returns. Half
// the bytes written of the fp32 form, which made the products 5-24 % faster (bench_gemm).
void matmul_bf16_out(const uint16_t* a, int64_t M, int64_t K, const uint16_t* w, int64_t N,
                     const float* bias, uint16_t* c);

}  // namespace nanscope::gemm_bf16
