// The products of one decode step (one token) of a Qwen3-4B-shaped decoder, on the kernel path
// the forward pass picks for one token (numerics/backend.hpp; NANSCOPE_NO_AVX512,
// NANSCOPE_DECODE and NANSCOPE_THREADS select the variants): 36 layers of q/k/v, o, gate/up +
// SiLU, down, then the lm_head, every weight a distinct bf16 array so that each step reads all
// 7.8 GB from memory as generate's steps do. One JSON line: the best and median step, GB/s.
//   bench_decode [--steps 8] [--layers 36] [--model DIR [--mapped]] [--interleave]
//                [--only qkv|o|gate_up|down|lm_head]
// --model: the weights of a checkpoint instead, read as generate reads them (resident copies, or
// the mapping with --mapped), so that a gap between this and generate's step is not the memory.
// --interleave: between the products, parallel regions like the step's attention and norms, so
// that a gap is not the workers' wake-ups either. Per kind of product, the median step's time.
#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "formats/checkpoint.hpp"
#include "model/arch.hpp"
#include "model/weights.hpp"
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
  std::string model;
  std::string only;  // one kind of product alone (a sweep of the kernel's tuning)
  bool mapped = false, interleave = false;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    const bool has_value = i + 1 < argc;
    if (k == "--steps" && has_value) {
      steps = std::atoi(argv[++i]);
    } else if (k == "--layers" && has_value) {
      layers = std::atoi(argv[++i]);
    } else if (k == "--model" && has_value) {
      model = argv[++i];
    } else if (k == "--mapped") {
      mapped = true;
    } else if (k == "--interleave") {
      interleave = true;
    } else if (k == "--only" && has_value) {
      only = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--steps 8] [--layers 36] [--model DIR [--mapped]] [--interleave]\n",
                   argv[0]);
      return 2;
    }
  }
  int64_t H = 2560, Q = 4096, KV = 1024, I = 9728, V = 151936;
  struct Layer {
    WeightView q, k, v, o, gate, up, down;
  };
  std::vector<Layer> ls;
  std::vector<Matrix> owned;  // the random weights (no --model)
  WeightView head;
  uint64_t bytes = 0;
  std::optional<Checkpoint> ck;
  ResidentWeights resident;
  std::optional<WeightSource> src;
  if (!model.empty()) {
    ck.emplace(Checkpoint::open(model));
    const ModelSpec spec = model_spec(ck->config());
    src.emplace(*ck, DType::BF16, false, nullptr, mapped ? nullptr : &resident);
    H = spec.hidden, V = spec.vocab;
    for (const LayerSpec& s : spec.layers) {
      const LayerWeights w = src->layer(s, H);
      ls.push_back({w.q, w.k, w.v, w.o, w.gate, w.up, w.down});
    }
    head = src->matrix(spec.tied ? spec.embed : spec.lm_head, V, H);
    const Layer& l0 = ls.front();
    Q = l0.q.rows, KV = l0.k.rows, I = l0.gate.rows;
    layers = int(ls.size());
  } else {
    owned.reserve(size_t(layers) * 7 + 1);
    auto add = [&](int64_t rows, int64_t cols, uint64_t seed) {
      owned.push_back(matrix(rows, cols, seed));
      return owned.back().view;
    };
    for (int l = 0; l < layers; ++l) {
      const uint64_t s = uint64_t(l) * 16;
      ls.push_back({add(Q, H, s + 1), add(KV, H, s + 2), add(KV, H, s + 3), add(H, Q, s + 4),
                    add(I, H, s + 5), add(I, H, s + 6), add(H, I, s + 7)});
    }
    head = add(V, H, 99);
  }
  constexpr int kKinds = 5;
  const char* kind_names[kKinds] = {"qkv", "o", "gate_up", "down", "lm_head"};
  int only_kind = -1;
  for (int i = 0; i < kKinds; ++i)
    if (only == kind_names[i]) only_kind = i;
  if (!only.empty() && only_kind < 0) {
    std::fprintf(stderr, "--only: one of qkv, o, gate_up, down, lm_head\n");
    return 2;
  }
  auto counted = [&](int kind) { return only_kind < 0 || only_kind == kind; };
  auto size = [](const WeightView& w) { return uint64_t(w.rows * w.cols) * 2; };
  for (const Layer& L : ls) {
    if (counted(0)) bytes += size(L.q) + size(L.k) + size(L.v);
    if (counted(1)) bytes += size(L.o);
    if (counted(2)) bytes += size(L.gate) + size(L.up);
    if (counted(3)) bytes += size(L.down);
  }
  if (counted(4)) bytes += size(head);

  const DType dt = DType::BF16;
  std::vector<float> x(H), q(Q), k(KV), v(KV), ctx(Q), o(H), act(I), down(H), logits(V);
  for (int64_t i = 0; i < H; ++i) x[size_t(i)] = round_to(0.01f * float(i % 97) - 0.4f, dt);
  for (int64_t i = 0; i < Q; ++i) ctx[size_t(i)] = round_to(0.02f * float(i % 31) - 0.3f, dt);
  // --interleave: the step's attention (one parallel region over 32 heads reading 160 cached
  // keys of 128) and a norm of one row between the products.
  std::vector<float> keys(size_t(32) * 160 * 128, 0.01f), scores(size_t(32) * 160), normed(H);
  std::vector<float> ones(H, 1.0f);
  auto attention_like = [&] {
    parallel_for(32, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t j = 0; j < 160; ++j) {
          float s = 0;
          for (int64_t d = 0; d < 128; ++d)
            s += keys[size_t((h * 160 + j) * 128 + d)] * q[size_t(d)];
          scores[size_t(h * 160 + j)] = s;
        }
    });
  };
  auto norm_like = [&] { rmsnorm(x.data(), 1, H, ones.data(), 1e-6, dt, normed.data(), false); };
  struct Step {
    double total = 0, kind[kKinds] = {};
  };
  std::vector<Step> times;
  using clock = std::chrono::steady_clock;
  for (int s = 0; s < steps + 1; ++s) {  // the first step warms up (page faults, pool start)
    Step st;
    const auto t0 = clock::now();
    auto timed = [&](int kind, auto&& fn) {
      if (!counted(kind)) return;
      const auto a = clock::now();
      fn();
      st.kind[kind] += std::chrono::duration<double>(clock::now() - a).count();
    };
    for (const Layer& L : ls) {
      if (interleave) norm_like();
      timed(0, [&] {
        const LinearOutput qkv[3] = {
            {L.q, nullptr, q.data()}, {L.k, nullptr, k.data()}, {L.v, nullptr, v.data()}};
        linear_shared_input(x.data(), 1, qkv, dt);
      });
      if (interleave) attention_like();
      timed(1, [&] { linear(ctx.data(), 1, L.o, nullptr, dt, o.data()); });
      if (interleave) norm_like();
      timed(2, [&] {
        linear_silu_mul(x.data(), 1, {L.gate, nullptr, nullptr}, {L.up, nullptr, nullptr}, dt,
                        act.data());
      });
      timed(3, [&] { linear(act.data(), 1, L.down, nullptr, dt, down.data()); });
    }
    if (interleave) norm_like();
    timed(4, [&] { linear(x.data(), 1, head, nullptr, dt, logits.data()); });
    st.total = std::chrono::duration<double>(clock::now() - t0).count();
    if (s > 0) times.push_back(st);
  }
  std::sort(times.begin(), times.end(),
            [](const Step& a, const Step& b) { return a.total < b.total; });
  const double best = times.front().total, median = times[times.size() / 2].total;
  nlohmann::json kinds;
  for (int i = 0; i < kKinds; ++i) kinds[kind_names[i]] = times[times.size() / 2].kind[i] * 1e3;
  const Backend& b = backend();
  const char* label = std::getenv("LABEL");
  std::printf("%s\n", nlohmann::json{{"label", label ? label : "bench_decode"},
                                     {"path", path_name(choose_linear_path(dt, 1))},
                                     {"threads", default_threads()},
                                     {"decode_rows", b.decode.rows},
                                     {"decode_prefetch", b.decode.prefetch},
                                     {"layers", layers},
                                     {"weights", model.empty() ? "random"
                                                 : mapped      ? "mapped"
                                                               : "resident"},
                                     {"interleave", interleave},
                                     {"only", only},
                                     {"x16", b.decode.x16},
                                     {"bytes", bytes},
                                     {"best_step_ms", best * 1e3},
                                     {"median_step_ms", median * 1e3},
                                     {"median_step_kinds_ms", kinds},
                                     {"gb_per_s", double(bytes) / best / 1e9}}
                          .dump()
                          .c_str());
  return 0;
}
