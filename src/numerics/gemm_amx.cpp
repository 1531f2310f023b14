// AMX bf16 linear layers: see gemm_amx.hpp. The tile instructions run only after available()
// said yes.
#include "numerics/gemm_amx.hpp"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "numerics/activations.hpp"
#include "numerics/dtype.hpp"
#include "numerics/dtype_simd.hpp"
#include "numerics/parallel.hpp"
#include "numerics/profile.hpp"

namespace nanscope::gemm_amx {

namespace {

// A tile register as configured here: 16 rows of 64 bytes (16 fp32, or 32 bf16 = 16 pairs).
constexpr int64_t kRows = 16;
constexpr int64_t kPairK = 32;                  // bf16 values of K per tile row
constexpr int64_t kTileElems = kRows * kPairK;  // bf16 per packed weight tile (1 KB)
constexpr int64_t kMicro = 32;                  // 2 x 2 tiles of C: 32 rows x 32 columns

// Block sizes (AmxTuning of backend.hpp, NANSCOPE_AMX_* for tuning): a worker computes C blocks
// of m x n (fp32, in its own buffer), K in steps of k (0: the whole K at once), inside which
// 32 x 32 micro blocks run k / 32 steps of four tile products, accumulating in the tiles. The next
// step's B tiles are prefetched into L1, and A's in the first micro block of a row (the one that
// brings that slice of A in from L3). Blocks are shared out with stealing. Defaults chosen on the
// 16-core Xeon (bench/amx_sweep.sh, session 4:
// bench/results/2026-11-27-session4-call2-amx-sweep.txt, BENCHMARKS.md), each best of 3 passes:
// 128 x 128 x whole K with both prefetches 157 ms of products per decoder layer at 4096 rows,
// 128 x 128 x 512 with B's prefetch 177 ms, the same without stealing 210 / 228 ms.
static_assert(kMicro == 32 && kPairK == 32, "valid(AmxTuning) of backend.cpp assumes 32");

AmxTuning blocking() {
  const AmxTuning& t = backend().amx_tuning;
  return valid(t) ? t : AmxTuning{};
}

// ---- Tile backends -------------------------------------------------------------------------
// The kernel below is written against this interface; tile numbers are template arguments
// because the AMX instructions take them as immediates.

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

// The instructions as inline assembly: the compiler's _tile_* macros paste their tile number
// into the instruction text, so they cannot take a template argument, and the mnemonics need no
// AMX compiler flags (binutils knows them), so no other code of this file can pick up AMX.
struct AmxTiles {
  void config() {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = kRows;
    __asm__ volatile("ldtilecfg %0" : : "m"(c));
  }
  void release() { __asm__ volatile("tilerelease" ::: "memory"); }
  template <int T>
  void zero() {
    __asm__ volatile("tilezero %%tmm%c0" : : "i"(T));
  }
  template <int T>
  void load(const void* p, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" : : "r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  void store(void* p, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" : : "r"(p), "r"(stride), "i"(T) : "memory");
  }
  template <int C, int A, int B>
  void dp() {
    __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" : : "i"(C), "i"(A), "i"(B));
  }
};

// The same operations on eight 1 KB arrays, following the instruction set reference's
// pseudo-code for TDPBF16PS (products of bf16 pairs added in order into fp32, bf16 subnormal
// inputs read as zero). Not bit-exact with every processor's internal rounding (the tests
// compare both with a tolerance); it exercises the packing, padding and blocking.
struct EmulatedTiles {
  alignas(64) uint8_t t[8][kRows * 64];
  void config() { std::memset(t, 0, sizeof t); }
  void release() {}
  template <int T>
  void zero() {
    std::memset(t[T], 0, sizeof t[T]);
  }
  template <int T>
  void load(const void* p, int64_t stride) {
    for (int64_t r = 0; r < kRows; ++r)
      std::memcpy(t[T] + r * 64, static_cast<const uint8_t*>(p) + r * stride, 64);
  }
  template <int T>
  void store(void* p, int64_t stride) {
    for (int64_t r = 0; r < kRows; ++r)
      std::memcpy(static_cast<uint8_t*>(p) + r * stride, t[T] + r * 64, 64);
  }
  static float daz(uint16_t h) {
    if ((h & 0x7f80) == 0) h &= 0x8000;  // subnormal (or zero) -> signed zero
    return bf16_to_f32(h);
  }
  template <int C, int A, int B>
  void dp() {
    for (int64_t m = 0; m < kRows; ++m) {
      float acc[16];
      std::memcpy(acc, t[C] + m * 64, 64);
      uint16_t a[32];
      std::memcpy(a, t[A] + m * 64, 64);
      for (int64_t k = 0; k < 16; ++k) {
        uint16_t b[32];
        std::memcpy(b, t[B] + k * 64, 64);
        for (int64_t n = 0; n < 16; ++n) {
          acc[n] += daz(a[2 * k]) * daz(b[2 * n]);
          acc[n] += daz(a[2 * k + 1]) * daz(b[2 * n + 1]);
        }
      }
      std::memcpy(t[C] + m * 64, acc, 64);
    }
  }
};

// ---- Operands ------------------------------------------------------------------------------

int64_t round_up(int64_t v, int64_t to) {
  return (v + to - 1) / to * to;
}

template <typename T>
using Buffer = std::vector<T, ActivationAllocator<T>>;

// 8 x 8 transpose of 32-bit elements: out row i = column i of the 8 input rows.
inline void transpose8(const __m256i in[8], __m256i out[8]) {
  const __m256 r0 = _mm256_castsi256_ps(in[0]), r1 = _mm256_castsi256_ps(in[1]),
               r2 = _mm256_castsi256_ps(in[2]), r3 = _mm256_castsi256_ps(in[3]),
               r4 = _mm256_castsi256_ps(in[4]), r5 = _mm256_castsi256_ps(in[5]),
               r6 = _mm256_castsi256_ps(in[6]), r7 = _mm256_castsi256_ps(in[7]);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
               t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
               t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  out[0] = _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x20));
  out[1] = _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x20));
  out[2] = _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x20));
  out[3] = _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x20));
  out[4] = _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x31));
  out[5] = _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x31));
  out[6] = _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x31));
  out[7] = _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x31));
}

// W [N, K] bf16 -> tiles of 16 output columns x 32 K values in the pair-interleaved layout the
// B operand of TDPBF16PS wants (row r of a tile holds, for each of its 16 columns, the pair
// K = 2r, 2r + 1), tile (nb, kb) at (nb * kt + kb) * 512. N padded to a multiple of 32, K to a
// multiple of 32, with zeros. As 32-bit pairs, each tile is a 16 x 16 transpose of W: four 8 x 8
// register transposes for whole tiles, element by element at the edges. Packs the column tiles
// [nb0, nb1) into packed (tile nb at (nb - nb0) * kt * 512): each worker packs the panel of
// columns it is about to use into its own buffer, which then stays in its caches (a separate
// packing pass wrote and re-read the whole matrix: 13 % of the products' time for a 4B model).
void pack_weights(const uint16_t* w, int64_t N, int64_t K, int64_t Kp, int64_t nb0, int64_t nb1,
                  uint16_t* packed) {
  const int64_t kt = Kp / kPairK;
  for (int64_t nb = nb0; nb < nb1; ++nb)
    for (int64_t kb = 0; kb < kt; ++kb) {
      uint32_t* tile = reinterpret_cast<uint32_t*>(packed + ((nb - nb0) * kt + kb) * kTileElems);
      if ((nb + 1) * kRows <= N && (kb + 1) * kPairK <= K) {
        const uint16_t* src = w + nb * kRows * K + kb * kPairK;
        for (int q = 0; q < 4; ++q) {  // quadrant: input rows n0.., pair columns r0..
          const int64_t n0 = (q & 1) * 8, r0 = (q >> 1) * 8;
          __m256i in[8], out[8];
          for (int i = 0; i < 8; ++i)
            in[i] =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (n0 + i) * K + 2 * r0));
          transpose8(in, out);
          for (int i = 0; i < 8; ++i)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + (r0 + i) * kRows + n0), out[i]);
        }
        continue;
      }
      for (int64_t n = 0; n < kRows; ++n) {
        const int64_t row = nb * kRows + n;
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t k = kb * kPairK + 2 * r;
          uint32_t v = 0;
          if (row < N) {
            if (k + 1 < K) {
              std::memcpy(&v, w + row * K + k, 4);
            } else if (k < K) {
              v = w[row * K + k];
            }
          }
          tile[r * kRows + n] = v;
        }
      }
    }
}

// Rows [r0, r1) of x (M rows of K fp32 values holding bf16 values, row stride ldx) -> bf16 A
// tiles of 16 rows x 32 K values, tile (mb, kb) at (mb * kt + kb) * 512, rows laid out one after
// another (a tile is 1 KB of contiguous memory: one stream for the prefetchers, no cache-set
// conflicts between its rows). Rows at or past M and columns past K are zeros; the narrowing is
// exact. row: scratch of kt * 32 values whose tail past K is zero.
void pack_a_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t kt, int64_t r0,
                 int64_t r1, uint16_t* row, uint16_t* a) {
  for (int64_t r = r0; r < r1; ++r) {
    if (r < M)
      store_from_f32(x + r * ldx, DType::BF16, reinterpret_cast<std::byte*>(row), size_t(K));
    else
      std::fill(row, row + K, uint16_t{0});
    uint16_t* dst = a + (r / kRows) * kt * kTileElems + (r % kRows) * kPairK;
    for (int64_t kb = 0; kb < kt; ++kb)
      std::memcpy(dst + kb * kTileElems, row + kb * kPairK, kPairK * 2);
  }
}

// x [M, K] -> A tiles for [Mp, Kp], rows split among the workers.
void pack_activations(const float* x, int64_t M, int64_t K, int64_t Mp, int64_t Kp, uint16_t* a) {
  parallel_for(Mp, kRows, [&](int64_t r0, int64_t r1) {
    std::vector<uint16_t> row(static_cast<size_t>(Kp), 0);
    pack_a_rows(x, K, M, K, Kp / kPairK, r0, r1, row.data(), a);
  });
}

// C [32 x 32] (fp32, row stride ldc) = (accumulate ? C : 0) + A x B over the K tiles [kb0, kb1):
// a0/a1 the A tiles of rows 0-15 / 16-31, b0/b1 the B tiles of columns 0-15 / 16-31 (consecutive
// K tiles 512 values apart). Below prefetch_end, the next K tile of B (pf_b) and of A (pf_a) is
// prefetched into L1.
template <typename Tiles>
void micro_block(Tiles& tiles, const uint16_t* a0, const uint16_t* a1, const uint16_t* b0,
                 const uint16_t* b1, int64_t kb0, int64_t kb1, bool accumulate, float* c,
                 int64_t ldc, int64_t prefetch_end, bool pf_b = true, bool pf_a = false) {
  const int64_t stride = ldc * 4;
  if (accumulate) {
    tiles.template load<0>(c, stride);
    tiles.template load<1>(c + kRows, stride);
    tiles.template load<2>(c + kRows * ldc, stride);
    tiles.template load<3>(c + kRows * ldc + kRows, stride);
  } else {
    tiles.template zero<0>();
    tiles.template zero<1>();
    tiles.template zero<2>();
    tiles.template zero<3>();
  }
  auto prefetch = [](const uint16_t* t0, const uint16_t* t1) {
    const char* p0 = reinterpret_cast<const char*>(t0);
    const char* p1 = reinterpret_cast<const char*>(t1);
    for (int l = 0; l < 1024; l += 64) {
      _mm_prefetch(p0 + l, _MM_HINT_T0);
      _mm_prefetch(p1 + l, _MM_HINT_T0);
    }
  };
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    if (kb + 1 < prefetch_end) {
      if (pf_b) prefetch(b0 + (kb + 1) * kTileElems, b1 + (kb + 1) * kTileElems);
      if (pf_a) prefetch(a0 + (kb + 1) * kTileElems, a1 + (kb + 1) * kTileElems);
    }
    tiles.template load<4>(a0 + kb * kTileElems, 64);
    tiles.template load<5>(a1 + kb * kTileElems, 64);
    tiles.template load<6>(b0 + kb * kTileElems, 64);
    tiles.template load<7>(b1 + kb * kTileElems, 64);
    tiles.template dp<0, 4, 6>();
    tiles.template dp<1, 4, 7>();
    tiles.template dp<2, 5, 6>();
    tiles.template dp<3, 5, 7>();
  }
  tiles.template store<0>(c, stride);
  tiles.template store<1>(c + kRows, stride);
  tiles.template store<2>(c + kRows * ldc, stride);
  tiles.template store<3>(c + kRows * ldc + kRows, stride);
}

// Rows [m0, m1) x columns [n0, n1) of C (fp32, row stride ldc) + bias, rounded to bf16, into out.
void finish(const float* c, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
            const float* bias, int64_t N, float* out) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* cr = c + (m - m0) * ldc - n0;
    float* o = out + m * N;
    int64_t n = n0;
#if NANSCOPE_HAVE_AVX2_F16C
    for (; n + 8 <= n1; n += 8) {
      __m256 v = _mm256_loadu_ps(cr + n);
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
      _mm256_storeu_ps(o + n, simd::round_bf16x8(v));
    }
#endif
    for (; n < n1; ++n) o[n] = round_bf16(bias ? cr[n] + bias[n] : cr[n]);
  }
}

// ---- The kernel ----------------------------------------------------------------------------

// A worker's buffers, kept between products: its weight panel (up to 2.5 MB) and its block of C.
// Allocated fresh and zero-filled for every product they cost a memset and page faults each
// time; every element is written before it is read (pack_weights fills whole tiles).
template <typename T>
class Scratch {
 public:
  T* get(size_t n) {
    if (n > size_) {
      data_.reset(new T[n]);
      size_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<T[]> data_;
  size_t size_ = 0;
};

struct WorkerBuffers {
  Scratch<uint16_t> panel[2];  // one per weight matrix of the product (two for linear_pair)
  Scratch<float> c[2];
};

WorkerBuffers& worker_buffers() {
  static thread_local WorkerBuffers b;
  return b;
}

// The input packed once for one or more products (linear_many: q/k/v, gate/up).
struct PackedInput {
  int64_t M = 0, K = 0, Mp = 0, Kp = 0;
  Buffer<uint16_t> a;
};

PackedInput pack_input(const float* x, int64_t M, int64_t K) {
  profile::Scope s("linear.amx_pack");
  PackedInput p;
  p.M = M, p.K = K, p.Mp = round_up(M, kMicro), p.Kp = round_up(K, kPairK);
  p.a.resize(static_cast<size_t>(p.Mp * p.Kp));
  pack_activations(x, M, K, p.Mp, p.Kp, p.a.data());
  return p;
}

// The products of the packed input with one or two weight matrices of the same shape (ws, N
// rows each), block by block; each finished block goes to done(C, ldc, m0, m1, n0, n1) with C[i]
// the fp32 sums (no bias) of rows [m0, m1) x columns [n0, n1) for ws[i], row stride ldc.
template <typename Tiles, typename Done>
void run(const PackedInput& in, std::span<const uint16_t* const> ws, int64_t N, Done&& done) {
  const int64_t M = in.M, K = in.K, Mp = in.Mp, Kp = in.Kp;
  if (M <= 0 || N <= 0) return;
  const int64_t nw = int64_t(ws.size());
  const AmxTuning bs = blocking();
  const int64_t Np = round_up(N, kMicro);
  const int64_t kt = Kp / kPairK;
  const Buffer<uint16_t>& a = in.a;
  profile::Scope s("linear.amx");
  const int64_t mblocks = (Mp + bs.m - 1) / bs.m, nblocks = (Np + bs.n - 1) / bs.n;
  const int64_t ldc = bs.n;
  const int64_t pf_end = bs.prefetch_a || bs.prefetch_b ? kt : 0;
  const int64_t kstep = bs.k > 0 ? bs.k : Kp;
  // One C block: consecutive blocks share their columns (B stays in the worker's caches).
  auto block = [&](Tiles& tiles, int64_t& panel_n0, int64_t idx) {
    WorkerBuffers& wb = worker_buffers();
    const int64_t m0 = (idx % mblocks) * bs.m, m1 = std::min(Mp, m0 + bs.m);
    const int64_t n0 = (idx / mblocks) * bs.n, n1 = std::min(Np, n0 + bs.n);
    float* C[2] = {};
    uint16_t* panel[2] = {};
    for (int64_t i = 0; i < nw; ++i) {
      C[i] = wb.c[i].get(size_t(bs.m * bs.n));
      panel[i] = wb.panel[i].get(size_t(bs.n * Kp));  // this worker's B columns
    }
    if (panel_n0 != n0) {
      for (int64_t i = 0; i < nw; ++i)
        pack_weights(ws[size_t(i)], N, K, Kp, n0 / kRows, n1 / kRows, panel[i]);
      panel_n0 = n0;
    }
    for (int64_t i = 0; i < nw; ++i)
      for (int64_t k0 = 0; k0 < Kp; k0 += kstep) {
        const int64_t k1 = std::min(Kp, k0 + kstep);
        auto micro = [&](int64_t mi, int64_t ni, bool stream_a) {
          const uint16_t* a0 = a.data() + (mi / kRows) * kt * kTileElems;
          const uint16_t* b0 = panel[i] + ((ni - n0) / kRows) * kt * kTileElems;
          micro_block(tiles, a0, a0 + kt * kTileElems, b0, b0 + kt * kTileElems, k0 / kPairK,
                      k1 / kPairK, k0 > 0, C[i] + (mi - m0) * ldc + (ni - n0), ldc, pf_end,
                      bs.prefetch_b, bs.prefetch_a && stream_a);
        };
        if (bs.n_outer) {
          for (int64_t ni = n0; ni < n1; ni += kMicro)
            for (int64_t mi = m0; mi < m1; mi += kMicro) micro(mi, ni, true);  // A streams
        } else {
          for (int64_t mi = m0; mi < m1; mi += kMicro)
            for (int64_t ni = n0; ni < n1; ni += kMicro) micro(mi, ni, ni == n0);  // A's first use
        }
      }
    done(static_cast<const float* const*>(C), ldc, m0, std::min(m1, M), n0, std::min(n1, N));
  };
  const int64_t blocks = mblocks * nblocks;
  if (!bs.steal) {
    parallel_for(blocks, 1, [&](int64_t lo, int64_t hi) {
      Tiles tiles;
      tiles.config();
      int64_t panel_n0 = -1;
      for (int64_t idx = lo; idx < hi; ++idx) block(tiles, panel_n0, idx);
      tiles.release();
    });
    return;
  }
  // Blocks shared out with stealing (parallel.hpp). The time workers spend waiting at the end
  // goes to the profile as linear.amx_idle (mean over workers).
  const int64_t workers = std::min<int64_t>(default_threads(), blocks);
  std::vector<int64_t> panel_of(size_t(workers), -1);
  const bool timing = profile::enabled();
  using Clock = std::chrono::steady_clock;
  std::vector<Clock::time_point> finished(size_t(workers), Clock::now());
  parallel_for_stealing(blocks, [&](int64_t wk, int64_t idx) {
    Tiles tiles;
    tiles.config();
    block(tiles, panel_of[size_t(wk)], idx);
    tiles.release();
    if (timing) finished[size_t(wk)] = Clock::now();
  });
  if (timing) {
    const Clock::time_point end = Clock::now();
    double idle = 0;
    for (const auto& t : finished) idle += std::chrono::duration<double>(end - t).count();
    profile::add("linear.amx_idle", idle / double(workers));
  }
}

// One product, finished into out with the bias and rounding to bf16.
template <typename Tiles>
void run_linear(const PackedInput& in, const uint16_t* w, int64_t N, const float* bias,
                float* out) {
  const uint16_t* const ws[1] = {w};
  run<Tiles>(in, ws, N,
             [&](const float* const* C, int64_t ldc, int64_t m0, int64_t m1, int64_t n0,
                 int64_t n1) { finish(C[0], ldc, m0, m1, n0, n1, bias, N, out); });
}

// ---- Small products for attention ---------------------------------------------------------
// One (sequence, head) of eager attention at a time, inside the caller's parallel loop: operands
// packed into thread-local tiles, 2 x 2 tiles of C over the whole (short) K, C through a
// thread-local buffer.

struct SmallBuffers {
  std::vector<uint16_t> a, row;
  std::vector<float> c;
};

SmallBuffers& small_buffers() {
  static thread_local SmallBuffers s;
  return s;
}

// Operand (k, n) of a product's right-hand side -> PackedB tiles [nt][kt]: a tile's row r holds,
// for each of its 16 columns, the pair of K = 2r, 2r + 1. From b holding N rows of K (k for
// q @ k^T): as 32-bit pairs each tile is a 16 x 16 transpose, done 8 x 8 in registers where whole;
// from b holding K rows of N (v for p @ v): two rows of b interleave into one tile row.
void pack_b_rows_n(const float* b, int64_t ldb, PackedB& out) {
  const int64_t N = out.N, K = out.K, kt = out.kt;
  uint16_t* tiles = out.tiles.data();
  const int64_t n8 = N / 8 * 8, k16 = K / 16 * 16;
  for (int64_t n0 = 0; n0 < n8; n0 += 8)
    for (int64_t k0 = 0; k0 < k16; k0 += 16) {
      __m256i in[8], tr[8];
      for (int i = 0; i < 8; ++i) {
        const float* src = b + (n0 + i) * ldb + k0;
        const __m128i lo = simd::to_bf16x8(_mm256_loadu_ps(src));
        const __m128i hi = simd::to_bf16x8(_mm256_loadu_ps(src + 8));
        in[i] = _mm256_set_m128i(hi, lo);  // 8 pairs of row n0 + i
      }
      transpose8(in, tr);  // tr[j]: pair k0 / 2 + j of rows n0 .. n0 + 7
      uint16_t* tile = tiles + ((n0 / kRows) * kt + k0 / kPairK) * kTileElems;
      for (int j = 0; j < 8; ++j) {
        const int64_t r = (k0 % kPairK) / 2 + j;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kPairK + (n0 % kRows) * 2),
                            tr[j]);
      }
    }
  // The edges: rows past n8, columns past k16.
  auto one = [&](int64_t n, int64_t k) {
    uint16_t* tile = tiles + ((n / kRows) * kt + k / kPairK) * kTileElems;
    tile[((k % kPairK) / 2) * kPairK + (n % kRows) * 2 + (k & 1)] = f32_to_bf16(b[n * ldb + k]);
  };
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = n < n8 ? k16 : 0; k < K; ++k) one(n, k);
}

void pack_b_rows_k(const float* b, int64_t ldb, PackedB& out) {
  const int64_t N = out.N, K = out.K, kt = out.kt;
  std::vector<uint16_t> row(static_cast<size_t>(N)), row2(row.size());
  for (int64_t k = 0; k < K; k += 2) {  // rows k and k + 1 of b interleave into one tile row
    store_from_f32(b + k * ldb, DType::BF16, reinterpret_cast<std::byte*>(row.data()), size_t(N));
    if (k + 1 < K)
      store_from_f32(b + (k + 1) * ldb, DType::BF16, reinterpret_cast<std::byte*>(row2.data()),
                     size_t(N));
    else
      std::fill(row2.begin(), row2.end(), uint16_t{0});
    for (int64_t n0 = 0; n0 < N; n0 += kRows) {
      uint16_t* dst = out.tiles.data() + ((n0 / kRows) * kt + k / kPairK) * kTileElems +
                      ((k % kPairK) / 2) * kPairK;
      const int64_t w = std::min<int64_t>(kRows, N - n0);
      int64_t n = 0;
      if (w == kRows) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row.data() + n0));
        const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row2.data() + n0));
        // unpack works within 128-bit halves: lanes 0-3 + 8-11, then 4-7 + 12-15; permute back.
        const __m256i lo = _mm256_unpacklo_epi16(x, y), hi = _mm256_unpackhi_epi16(x, y);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                            _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16),
                            _mm256_permute2x128_si256(lo, hi, 0x31));
        n = kRows;
      }
      for (; n < w; ++n) {
        dst[2 * n] = row[size_t(n0 + n)];
        dst[2 * n + 1] = row2[size_t(n0 + n)];
      }
    }
  }
}

void prepare(PackedB& out, int64_t N, int64_t K) {
  out.N = N, out.K = K;
  out.nt = round_up(N, kMicro) / kRows, out.kt = round_up(K, kPairK) / kPairK;
  out.tiles.assign(size_t(out.nt * out.kt * kTileElems), uint16_t{0});
}

template <typename Tiles>
void small_product(const float* a, int64_t lda, int64_t M, const PackedB& pb, float* c,
                   int64_t ldc) {
  const int64_t N = pb.N, K = pb.K;
  if (M <= 0 || N <= 0) return;
  const int64_t Mp = round_up(M, kMicro), Np = pb.nt * kRows;
  const int64_t mt = Mp / kRows, nt = pb.nt, kt = pb.kt;
  SmallBuffers& sb = small_buffers();
  sb.a.resize(size_t(mt * kt * kTileElems));
  sb.row.assign(size_t(kt * kPairK), uint16_t{0});
  sb.c.resize(size_t(Mp * Np));
  pack_a_rows(a, lda, M, K, kt, 0, Mp, sb.row.data(), sb.a.data());
  Tiles tiles;
  tiles.config();
  for (int64_t mi = 0; mi < mt; mi += 2)
    for (int64_t ni = 0; ni < nt; ni += 2) {
      const uint16_t* a0 = sb.a.data() + mi * kt * kTileElems;
      const uint16_t* b0 = pb.tiles.data() + ni * kt * kTileElems;
      micro_block(tiles, a0, a0 + kt * kTileElems, b0, b0 + kt * kTileElems, 0, kt, false,
                  sb.c.data() + mi * kRows * Np + ni * kRows, Np, 0);
    }
  tiles.release();
  for (int64_t m = 0; m < M; ++m) std::memcpy(c + m * ldc, sb.c.data() + m * Np, size_t(N) * 4);
}

// Calls fn with the tiles amx_tiles() of backend.hpp selects (a default-constructed AmxTiles or
// EmulatedTiles); callers reach here only where it selects some.
template <typename Fn>
void with_tiles(Fn&& fn) {
  if (amx_tiles() == MatmulPath::AmxEmulated)
    fn(EmulatedTiles{});
  else
    fn(AmxTiles{});
}

PackedB& scratch_b() {
  static thread_local PackedB b;
  return b;
}

}  // namespace

bool available() {
  return amx_tiles().has_value();
}

void linear(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,
            float* out) {
  const LinearJob job{w, N, bias, out};
  linear_many(x, M, K, std::span<const LinearJob>(&job, 1));
}

void linear_many(const float* x, int64_t M, int64_t K, std::span<const LinearJob> jobs) {
  if (M <= 0 || jobs.empty()) return;
  const PackedInput in = pack_input(x, M, K);
  for (const LinearJob& j : jobs)
    with_tiles([&](auto tiles) { run_linear<decltype(tiles)>(in, j.w, j.N, j.bias, j.out); });
}

void linear_pair(const float* x, int64_t M, int64_t K, const uint16_t* w0, const uint16_t* w1,
                 int64_t N, const PairDone& done) {
  if (M <= 0 || N <= 0) return;
  const PackedInput in = pack_input(x, M, K);
  const uint16_t* const ws[2] = {w0, w1};
  with_tiles([&](auto tiles) {
    run<decltype(tiles)>(in, ws, N,
                         [&](const float* const* C, int64_t ldc, int64_t m0, int64_t m1, int64_t n0,
                             int64_t n1) { done(C[0], C[1], ldc, m0, m1, n0, n1); });
  });
}

void pack_rows_n(const float* b, int64_t ldb, int64_t N, int64_t K, PackedB& out) {
  prepare(out, N, K);
  pack_b_rows_n(b, ldb, out);
}

void pack_rows_k(const float* b, int64_t ldb, int64_t K, int64_t N, PackedB& out) {
  prepare(out, N, K);
  pack_b_rows_k(b, ldb, out);
}

void matmul_packed(const float* a, int64_t lda, int64_t M, const PackedB& b, float* c,
                   int64_t ldc) {
  with_tiles([&](auto tiles) { small_product<decltype(tiles)>(a, lda, M, b, c, ldc); });
}

void matmul_nt(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
               int64_t M, int64_t N, int64_t K) {
  PackedB& pb = scratch_b();
  pack_rows_n(b, ldb, N, K, pb);
  matmul_packed(a, lda, M, pb, c, ldc);
}

void matmul_nn(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
               int64_t M, int64_t N, int64_t K) {
  PackedB& pb = scratch_b();
  pack_rows_k(b, ldb, K, N, pb);
  matmul_packed(a, lda, M, pb, c, ldc);
}

Peak peak(int64_t steps) {
  Peak p;
  for (int pass = 0; pass < 2; ++pass) {
    const int threads = default_threads();
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(threads, 1, [&](int64_t, int64_t) {
      alignas(64) static thread_local uint16_t buf[4 * kTileElems] = {};
      AmxTiles t;
      t.config();
      t.zero<0>(), t.zero<1>(), t.zero<2>(), t.zero<3>();
      t.load<4>(buf, 64), t.load<5>(buf + kTileElems, 64);
      t.load<6>(buf + 2 * kTileElems, 64), t.load<7>(buf + 3 * kTileElems, 64);
      for (int64_t i = 0; i < steps; ++i) {
        if (pass == 1) {
          t.load<4>(buf, 64), t.load<5>(buf + kTileElems, 64);
          t.load<6>(buf + 2 * kTileElems, 64), t.load<7>(buf + 3 * kTileElems, 64);
        }
        t.dp<0, 4, 6>(), t.dp<1, 4, 7>(), t.dp<2, 5, 6>(), t.dp<3, 5, 7>();
      }
      t.release();
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // Each product: 16 x 16 outputs x 32 products x 2 FLOP.
    const double gflops = double(threads) * double(steps) * 4 * 16 * 16 * 32 * 2 / s / 1e9;
    (pass == 0 ? p.products : p.with_loads) = gflops;
  }
  return p;
}

void linear_emulated(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N,
                     const float* bias, float* out) {
  if (M <= 0) return;
  run_linear<EmulatedTiles>(pack_input(x, M, K), w, N, bias, out);
}

}  // namespace nanscope::gemm_amx
