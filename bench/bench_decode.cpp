// The products of one decode step (one token) of a Qwen3-4B-shaped decoder, on the kernel path
// the forward pass picks for one token (numerics/backend.hpp; NANSCOPE_NO_AVX512,
// NANSCOPE_DECODE and NANSCOPE_THREADS select the variants): 36 layers of q/k/v, o, gate/up +
// SiLU, down, then the lm_head, every weight a distinct bf16 array so that each step reads all
// 7.8 GB from memory as generate's steps do. One JSON line: the best and median step, GB/s.
//   bench_decode [--steps 8] [--layers 36]
// The gap between this and generate's decode step is the step's other work (attention, norms,
// RoPE, the observer, the cache).
#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "numerics/backend.hpp"
#include "numerics/dtype.hpp"
#include "numerics/kernels.hpp"
#include "numerics/parallel.hpp"

namespace {

using namespace nanscope;

// bf16 values uniform in about [-0.05, 0.05): a splitmix stream per chunk, filled in parallel.
std::vector<uint16_t> random_bf16(int64_t n, uint64_t seed) {
  std::vector<uint16_t> v(static_cast<size_t>(n));
  parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + uint64_t(b);
    for (int64_t i = b; i < e; ++i) {
      s += 0x9E3779B97F4A7C15ull;
      uint64_t z = (s ^ (s >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      const float f = (float(z >> 40) / float(1 << 24) - 0.5f) * 0.1f;
      v[size_t(i)] = uint16_t(std::bit_cast<uint32_t>(f) >> 16);
    }
  });
  return v;
}

struct Matrix {
  std::vector<uint16_t> data;
  WeightView view;
};

Matrix matrix(int64_t rows, int64_t cols, uint64_t seed) {
  Matrix m{random_bf16(rows * cols, seed), {}};
  m.view = {reinterpret_cast<const std::byte*>(m.data.data()), DType::BF16, rows, cols};
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 8, layers = 36;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--steps") {
      steps = std::atoi(argv[i + 1]);
    } else if (k == "--layers") {
      layers = std::atoi(argv[i + 1]);
    } else {
      std::fprintf(stderr, "usage: %s [--steps 8] [--layers 36]\n", argv[0]);
      return 2;
    }
  }
  constexpr int64_t H = 2560, Q = 4096, KV = 1024, I = 9728, V = 151936;
  struct Layer {
    Matrix q, k, v, o, gate, up, down;
  };
  std::vector<Layer> ls;
  uint64_t bytes = 0;
  for (int l = 0; l < layers; ++l) {
    const uint64_t s = uint64_t(l) * 16;
    ls.push_back({matrix(Q, H, s + 1), matrix(KV, H, s + 2), matrix(KV, H, s + 3),
                  matrix(H, Q, s + 4), matrix(I, H, s + 5), matrix(I, H, s + 6),
                  matrix(H, I, s + 7)});
    bytes += 2 * uint64_t(2 * Q * H + 2 * KV * H + 3 * I * H);
  }
  const Matrix head = matrix(V, H, 99);
  bytes += 2 * uint64_t(V * H);

  const DType dt = DType::BF16;
  std::vector<float> x(H), q(Q), k(KV), v(KV), ctx(Q), o(H), act(I), down(H), logits(V);
  for (int64_t i = 0; i < H; ++i) x[size_t(i)] = round_to(0.01f * float(i % 97) - 0.4f, dt);
  for (int64_t i = 0; i < Q; ++i) ctx[size_t(i)] = round_to(0.02f * float(i % 31) - 0.3f, dt);
  std::vector<double> times;
  for (int s = 0; s < steps + 1; ++s) {  // the first step warms up (page faults, pool start)
    const auto t0 = std::chrono::steady_clock::now();
    for (const Layer& L : ls) {
      const LinearOutput qkv[3] = {{L.q.view, nullptr, q.data()},
                                   {L.k.view, nullptr, k.data()},
                                   {L.v.view, nullptr, v.data()}};
      linear_shared_input(x.data(), 1, qkv, dt);
      linear(ctx.data(), 1, L.o.view, nullptr, dt, o.data());
      linear_silu_mul(x.data(), 1, {L.gate.view, nullptr, nullptr}, {L.up.view, nullptr, nullptr},
                      dt, act.data());
      linear(act.data(), 1, L.down.view, nullptr, dt, down.data());
    }
    linear(x.data(), 1, head.view, nullptr, dt, logits.data());
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s > 0) times.push_back(sec);
  }
  std::sort(times.begin(), times.end());
  const double best = times.front(), median = times[times.size() / 2];
  const Backend& b = backend();
  const char* label = std::getenv("LABEL");
  std::printf("%s\n", nlohmann::json{{"label", label ? label : "bench_decode"},
                                     {"path", path_name(choose_linear_path(dt, 1))},
                                     {"threads", default_threads()},
                                     {"decode_rows", b.decode.rows},
                                     {"decode_prefetch", b.decode.prefetch},
                                     {"layers", layers},
                                     {"bytes", bytes},
                                     {"best_step_ms", best * 1e3},
                                     {"median_step_ms", median * 1e3},
                                     {"gb_per_s", double(bytes) / best / 1e9}}
                          .dump()
                          .c_str());
  return 0;
}
