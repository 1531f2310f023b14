// The GPU kernels of the CUDA forward pass (kernels.cu), behind plain launchers so that the host
// side (forward_cuda.cpp) is ordinary C++. Activations are fp32 device arrays whose values are
// already rounded to the run dtype, as on the CPU (numerics/kernels.hpp); matrix-product inputs
// are converted to the run dtype's storage first (to_storage). Every rounding is the one
// transformers does on the GPU (docs/cuda.md). All launches go to the stream of
// set_stream (the legacy default stream unless a decode step is being captured or replayed).
#pragma once

#include <cstdint>

namespace nanscope::cuda {

enum class Dt : int { F32 = 0, BF16 = 1, F16 = 2 };
inline int64_t dt_bytes(Dt d) {
  return d == Dt::F32 ? 4 : 2;
}

// A site's statistics, accumulated on the GPU: any element not finite (for scores, masked
// positions may hold -inf), and the largest finite |value| as float bits (non-negative floats
// order like their bits).
struct SiteStats {
  unsigned int nonfinite = 0;
  unsigned int peak_bits = 0;
};

// out[i] = x[i] in the run dtype's storage (bf16/fp16 bits, or a copy for fp32); x holds values
// already rounded, so the conversion is exact.
void to_storage(const float* x, void* out, int64_t n, Dt dt);
// dst[i] = src[i] cast from storage sdt to storage ddt (round to nearest even, inf past the range).
void convert(const void* src, Dt sdt, void* dst, Dt ddt, int64_t n);
// out[r, c] = round(float(c_in[r, c]) + bias[c]) (bias nullable); c_in in storage `ctype`.
void bias_round(const void* c_in, Dt ctype, const float* bias, int64_t rows, int64_t cols, Dt dt,
                float* out);
// bias_round of up to three products' outputs in one launch (q/k/v, gate/up of a decode step).
struct RoundSegment {
  const void* c_in;
  Dt ctype;           // c_in's storage
  const float* bias;  // nullable
  float* out;
  int64_t cols;
  // c_in's row stride in elements, 0 for cols: a column range of one product whose weight joins
  // several matrices (q/k/v, gate/up). Read by pass_qkv and step_act only.
  int64_t ld = 0;
};
struct RoundSegments {
  RoundSegment seg[3];
  int n = 0;
};
void bias_round_many(const RoundSegments& segs, int64_t rows, Dt dt);
// transformers' RMSNorm per row of n: y = round(x * rsqrt(mean(x^2) + eps)); out = round(w * y);
// offset (Gemma): out = round(x * rsqrt(...) * (1 + w)). out may be x (in place). storage
// (nullable): out in the run dtype's storage too (to_storage's copy for the next product, in the
// same launch: a decode step is some thousand small launches).
void rmsnorm(const float* x, int64_t rows, int64_t n, const float* w, float eps, bool offset, Dt dt,
             float* out, void* storage = nullptr);
// In place on x [rows, heads, head_dim]: the first rot dims of each head rotated with the table
// row rowoff[r] + shift (tables [*, rot], values in the run dtype; shift: a decode step's
// position times rot, so that one offset array serves every step):
// x = round(round(x * cos) + round(rotate_half(x) * sin)). dpos (a device scalar, nullable):
// shift = *dpos * rot instead, read when the kernel runs (a captured decode step).
void rope(float* x, int64_t rows, int64_t heads, int64_t head_dim, int64_t rot, const float* cos,
          const float* sin, const int64_t* rowoff, Dt dt, int64_t shift = 0,
          const int64_t* dpos = nullptr);
void add_round(const float* a, const float* b, int64_t n, Dt dt, float* out);
// y = round(y + lo * scale) in fp32 (no FMA), in place: an unmerged LoRA's branch joining the
// base product's output y ([n / rows, rows], already rounded), as PeftModel adds it. m (DoRA's
// magnitude / weight norm per row, nullable): y = round(y + (m - 1) * base + m * lo * scale),
// base = round(y - bias) where the base layer has a bias (nullable), else y.
void lora_add(float* y, const float* lo, int64_t n, int64_t rows, float scale, Dt dt,
              const float* m = nullptr, const float* bias = nullptr);
// out [T, rows] = v [rows] in every row (a product's bias before a beta = 1 product adds to it).
void fill_rows(const float* v, int64_t rows, int64_t T, float* out);
// act = round(round(f(g)) * u), f = silu (act 0) or gelu-tanh (act 1); storage as rmsnorm's.
void act_mul(const float* g, const float* u, int64_t n, int act, Dt dt, float* out,
             void* storage = nullptr);
// v = round(round(tanh(round(v / cap))) * cap).
void softcap(float* v, int64_t n, float cap, Dt dt);
// Statistics of n values: any non-finite, largest finite |value|.
void site_stats(const float* v, int64_t n, SiteStats* st);

// hidden --pool on the GPU, for each sequence s (rows [off[s], off[s] + len[s]) of x [*, H]):
// last[s] = its last row, mean[s] = its mean (an fp32 sum over the rows in order, divided by
// len[s]), either nullable; nonfinite[s] |= 1 where any element of its rows is not finite (zero
// it first).
void pool_states(const float* x, const int64_t* off, const int64_t* len, int64_t seqs, int64_t H,
                 float* last, float* mean, unsigned int* nonfinite);

// A decode step's input on the GPU: out [T, H] = rows ids[t] of the embedding table [vocab, H]
// (in the run dtype's storage), times scale rounded to the run dtype where scale != 0 (Gemma).
void embed_rows(const void* table, Dt dt, const int64_t* ids, int64_t T, int64_t H, float scale,
                float* out);
// out[0] = the first index of the largest of v[0, n) (generate's argmax; meaningful where every
// value is finite), out[1] = 1 if any value is not finite, else 0: the greedy choice without the
// logits row leaving the GPU. scratch: argmax_scratch_bytes() of device memory (the partials).
void argmax_finite(const float* v, int64_t n, int64_t* out, void* scratch);
size_t argmax_scratch_bytes();

// Eager attention's elementwise steps and softmax on nmat score matrices [Tq, T] (Tq queries,
// T keys; query r sits at key column c0 + r: 0 without a cache, the cached keys before it with
// one): S holds q.k^T in fp32 on entry; on return round(round(round(S) * scaling) [softcap] +
// mask) (mask on keys j > c0 + r or out of the window), and P = round(softmax_fp32(S)) (fp32
// values, and in storage for p.v in pstore). st (nullable) gets the scores' statistics: peak
// over visible raw q.k, non-finite by the masked-key rule.
void eager_softmax(float* S, float* P, void* pstore, int64_t nmat, int64_t Tq, int64_t T,
                   int64_t c0, float scaling, float cap, int64_t window, float mask, Dt dt,
                   SiteStats* st);

// Fused attention (flash-style: fp32 scores and online softmax, exp2 as FlashAttention-2 does,
// probabilities rounded to the run dtype for p.v, output round(acc / l)) on nmat score
// blocks [Tq, T] of q.k^T in fp32 (S, from the tensor-core product; query r at key column c0 + r
// as in eager_softmax; matrix mat is head mat % heads of the sequence starting at row
// seg_off[mat / heads] of v [rows, kv_heads*D] and ctx [rows, heads*D]). P (nullable, the
// sites): S then holds the scaled scores (-inf where masked) and P the probabilities. st
// (nullable): peak of |s * scaling|, non-finite scores.
void fused_softmax_pv(float* S, const float* v, int64_t nmat, int64_t Tq, int64_t T, int64_t c0,
                      int64_t heads, int64_t kv_heads, int64_t D, const int64_t* seg_off,
                      float scaling, int64_t window, Dt dt, float* ctx, float* P, SiteStats* st);

// Attention in one launch per layer for passes without a cache or sites (hidden's batches),
// tensor-core q.k^T and p.v: fused as FlashAttention-2 computes it (its tiles and order; the
// arithmetic of fused_softmax_pv), or with `eager` the numbers of eager_softmax and its p.v
// product (cap: soft-capping, 0 for none; mask: the dtype's lowest, eager's additive mask) but
// the order of p.v's fp32 sums. q [rows, heads*D], k and v [rows, kv_heads*D] in the run dtype's
// storage; tiles: ntiles x {first row of the sequence, its length, first query (a multiple of
// kFlashQueries)}, on the GPU; ctx [rows, heads*D] fp32, rounded, or with ctx_storage in the run
// dtype's storage there instead (o_proj's input, when nothing else reads ctx). Causal, optionally a
// sliding window. bound (eager; nullable): site_stats of q and of k, [2]; without it every key of a
// sequence is scored for eager's NaN rule. flash_attention_supports: the head sizes and dtypes it
// has (bf16/fp16; D 16, 32, 64, 80, 96, 128).
constexpr int64_t kFlashQueries = 64;  // queries per tile (a block: 16 per warp)
bool flash_attention_supports(int64_t D, Dt dt);
void flash_attention(const void* q, const void* k, const void* v, const int32_t* tiles,
                     int64_t ntiles, int64_t heads, int64_t kv_heads, int64_t D, bool eager,
                     float scaling, float cap, float mask, int64_t window, Dt dt,
                     const SiteStats* bound, float* ctx, void* ctx_storage = nullptr);

// Every launch of this file goes to `stream` (a cudaStream_t; null: the legacy default stream).
void set_stream(void* stream);

// A captured decode step (forward_cuda.cpp, NANSCOPE_CUDA_GRAPH=1), whose position is the device
// scalar *pos: its key and value rows k, v [kvd] (fp32, rounded) into the cache at row *pos (k and
// v in storage, v also in fp32 in vf).
void cache_append(const float* k, const float* v, int64_t kvd, const int64_t* pos, void* kst,
                  void* vst, float* vf, Dt dt);
// A decode step's fused launches (one token; each computes what the launches it replaces did,
// element for element and with the same reductions, so the tokens do not depend on the fusion):
// step_qkv: bias_round of the q/k/v products (proj.seg[0..2], rows = 1), q/k RMSNorm per head
// (q_norm/k_norm nullable), RoPE at position *pos (tables and rowoff as rope's), q into `q`
// [heads * D], k and v into the cache at row *pos (cache_append's layout).
struct StepQkv {
  RoundSegments proj;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  float eps = 0.0f;
  bool offset = false;  // Gemma's (1 + w)
  const float* cos = nullptr;
  const float* sin = nullptr;
  const int64_t* rowoff = nullptr;
  int64_t rot = 0;
  const int64_t* pos = nullptr;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  float* q = nullptr;
  void* kst = nullptr;
  void* vst = nullptr;
  float* vf = nullptr;
  Dt dt = Dt::F32;
};
void step_qkv(const StepQkv& a);
// step_qkv's work for a pass without a cache: for each of `tokens` rows of the q, k and v
// products, bias_round, q/k norm and RoPE (table row rowoff[t]), the results in storage at q, k,
// v ([tokens, heads or kv_heads, head_dim]); with stats, site_stats of the q and k written
// (stats[0], stats[1], zeroed by the caller). The same per-element steps and reductions as
// bias_round_many, rmsnorm, rope and to_storage one after the other.
struct PassQkv {
  RoundSegments proj;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  float eps = 0.0f;
  bool offset = false;
  const float* cos = nullptr;
  const float* sin = nullptr;
  const int64_t* rowoff = nullptr;
  int64_t rot = 0;
  int64_t tokens = 0, heads = 0, kv_heads = 0, head_dim = 0;
  void* q = nullptr;
  void* k = nullptr;
  void* v = nullptr;
  SiteStats* stats = nullptr;
  Dt dt = Dt::BF16;
};
void pass_qkv(const PassQkv& a);
// h = round(h + bias_round(product)) over rows x n, then out = rmsnorm(h) with w (and in storage;
// each nullable): add_round followed by rmsnorm in one launch.
void residual_norm(float* h, const RoundSegment& product, int64_t rows, int64_t n, const float* w,
                   float eps, bool offset, Dt dt, float* out, void* storage);
// act_mul of bias_round(gate) and bias_round(up) (n elements), in one launch; out (fp32) and
// storage each nullable.
void step_act(const RoundSegment& gate, const RoundSegment& up, int64_t n, int act, Dt dt,
              float* out, void* storage);

// A product of one row (a decode step's, or any pass of one token), by warps instead of cuBLAS:
// out_j [rows_j] = x [K] . w_j^T for up to three matrices w_j [rows_j, K] of one input, all in
// the run dtype's storage, fp32 sums in a fixed order (kernels.cu), each output stored as otype
// (the run dtype, rounded once, or fp32 for a bias to be added: products()' convention).
struct GemvJob {
  const void* w = nullptr;
  int64_t rows = 0;
  void* out = nullptr;
  Dt otype = Dt::F32;
};
struct GemvJobs {
  GemvJob job[3];
  int n = 0;
};
void gemv(const void* x, int64_t K, const GemvJobs& jobs, Dt dt);
// gate and up of one row and step_act's activation of their rounded products, in one launch
// (no biases): out [n] and its storage copy (nullable).
void gemv_act(const void* x, int64_t K, const void* wg, const void* wu, int64_t n, int act, Dt dt,
              float* out, void* storage);

// Its attention: q [heads * D] (fp32, rounded) against the cache rows [lo, *pos] (lo: the last
// window - 1 before it for a sliding-window layer, else 0), eager or fused as the kernels above
// compute them (kernels.cu says where the order of sums differs). S: scratch [heads, sstride],
// sstride >= the keys; ctx [heads * D], rounded, and in storage into ctx_storage (nullable).
void decode_attention(const float* q, const void* kc, const void* vc, const float* vf,
                      const int64_t* pos, int64_t heads, int64_t kv_heads, int64_t D, float scaling,
                      float cap, int64_t window, bool fused, Dt dt, float* S, int64_t sstride,
                      float* ctx, void* ctx_storage = nullptr);

}  // namespace nanscope::cuda
