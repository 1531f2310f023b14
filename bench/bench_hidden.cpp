// Times hidden-state extraction (every state, as output_hidden_states) of random-id prompts and
// prints one JSON line with tokens/s and the peak RSS (getrusage):
//   bench_hidden MODEL_DIR [PROMPTS=64] [TOKENS=128|@LENGTHS_FILE] [DTYPE=bf16] [ATTENTION=eager]
//   [BATCH_TOKENS=4096] [DEVICE=cpu|cuda] [POOLS=none|last|mean|last,mean] [ORDER=unsorted|sorted]
// Prompts go through the batched forward pass BATCH_TOKENS tokens at a time, as `nanscope
// hidden` runs them; every state is received as float32 (nothing is written to disk), or with
// POOLS its last-token and/or mean rows per prompt (hidden_states_pooled: on the GPU, pooled
// there). @LENGTHS_FILE: one prompt length per line (PROMPTS is then their count); sorted: the
// prompts by length before batching.
// bench/reference/ref_hidden.py and ref_pooled.py are the transformers sides for the same job.
// On cuda, one prompt runs first (untimed, as "upload_seconds"): it uploads the weights, which
// later batches reuse, as transformers' from_pretrained(device_map="cuda") does before its timing.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.hpp"
#include "cuda/forward_cuda.hpp"
#include "tools/hidden.hpp"
#include "tools/trace.hpp"

int main(int argc, char** argv) {
  using namespace nanscope;
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: %s MODEL_DIR [PROMPTS=64] [TOKENS=128] [DTYPE=bf16] [eager|fused] "
                 "[BATCH_TOKENS=4096] [cpu|cuda]\n",
                 argv[0]);
    return 2;
  }
  int64_t prompts = argc > 2 ? std::atoll(argv[2]) : 64;
  std::vector<int64_t> lengths;
  if (argc > 3 && argv[3][0] == '@') {
    std::ifstream f(argv[3] + 1);
    for (int64_t n; f >> n;) lengths.push_back(n);
    prompts = int64_t(lengths.size());
  } else {
    lengths.assign(size_t(std::max<int64_t>(prompts, 0)), argc > 3 ? std::atoll(argv[3]) : 128);
  }
  const int64_t tokens = lengths.empty() ? 0 : lengths[0];
  ForwardOptions fwd;
  if (argc > 4) {
    auto dt = parse_run_dtype(argv[4]);
    if (!dt) {
      std::fprintf(stderr, "bad dtype %s\n", argv[4]);
      return 2;
    }
    fwd.dtype = *dt;
  }
  if (argc > 5) {
    auto at = parse_attention(argv[5]);
    if (!at) {
      std::fprintf(stderr, "bad attention %s\n", argv[5]);
      return 2;
    }
    fwd.attention = *at;
  }
  const int64_t batch_tokens = argc > 6 ? std::atoll(argv[6]) : 4096;
  std::vector<Pool> pools;
  const std::string pool_arg = argc > 8 ? argv[8] : "none";
  if (pool_arg == "last" || pool_arg == "last,mean") pools.push_back(Pool::Last);
  if (pool_arg == "mean" || pool_arg == "last,mean") pools.push_back(Pool::Mean);
  const bool sorted = argc > 9 && std::string(argv[9]) == "sorted";
  if (prompts <= 0 || batch_tokens <= 0 ||
      std::any_of(lengths.begin(), lengths.end(), [](int64_t n) { return n <= 0; }) ||
      (pools.empty() && pool_arg != "none")) {
    std::fprintf(stderr, "PROMPTS, TOKENS must be positive; POOLS none|last|mean|last,mean\n");
    return 2;
  }
  try {
    if (argc > 7) fwd.device = parse_device_flag(argv[7]);
    const auto t0 = std::chrono::steady_clock::now();
    const Checkpoint ck = Checkpoint::open(argv[1]);
    // Keep the weights mapped between prompts: releasing pages after every layer would make
    // each prompt read the model from disk again.
    fwd.release_pages = false;
    std::mt19937_64 rng(1234);
    std::uniform_int_distribution<int64_t> dist(0, ck.config().vocab_size - 1);
    const auto t1 = std::chrono::steady_clock::now();
    std::vector<HiddenInput> inputs(static_cast<size_t>(prompts));
    int64_t total = 0;
    for (int64_t p = 0; p < prompts; ++p) {
      inputs[size_t(p)].id = std::to_string(p);
      for (int64_t t = 0; t < lengths[size_t(p)]; ++t) inputs[size_t(p)].ids.push_back(dist(rng));
      total += lengths[size_t(p)];
    }
    std::vector<size_t> order(inputs.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    if (sorted)
      std::stable_sort(order.begin(), order.end(),
                       [&](size_t a, size_t b) { return lengths[a] < lengths[b]; });
    double checksum = 0;
    const int64_t last = ck.config().num_hidden_layers;
    const auto run = [&](std::span<const HiddenInput* const> batch) {
      if (pools.empty())
        hidden_states_batch(ck, batch, fwd, {}, [&](size_t i, int64_t k, std::span<const float> st) {
          if (i == 0 && k == last) checksum += double(st[0]);
        });
      else
        hidden_states_pooled(ck, batch, fwd, {}, pools,
                             [&](size_t i, int64_t k, Pool, std::span<const float> v, bool) {
                               if (i == 0 && k == last) checksum += double(v[0]);
                             });
    };
    double upload = 0;
    if (fwd.device == Device::Cuda) {
      const HiddenInput* first = &inputs[0];
      run(std::span<const HiddenInput* const>(&first, 1));
      checksum = 0;
      upload = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    }
    const auto t1b = std::chrono::steady_clock::now();
    std::vector<int64_t> ordered;
    for (size_t i : order) ordered.push_back(lengths[i]);
    for (const auto& [b0, b1] : batch_ranges(ordered, batch_tokens)) {
      std::vector<const HiddenInput*> batch;
      for (size_t p = b0; p < b1; ++p) batch.push_back(&inputs[order[p]]);
      run(batch);
    }
    const auto t2 = std::chrono::steady_clock::now();
    const double secs = std::chrono::duration<double>(t2 - t1b).count();
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    nlohmann::json j = {{"tool", "nanscope"},
                        {"model", argv[1]},
                        {"prompts", prompts},
                        {"tokens", tokens},
                        {"total_tokens", total},
                        {"pools", pool_arg},
                        {"order", sorted ? "sorted" : "unsorted"},
                        {"batch_tokens", batch_tokens},
                        {"dtype", run_dtype_name(fwd.dtype)},
                        {"attention", attention_name(fwd.attention)},
                        {"device", device_name(fwd.device)},
                        {"upload_seconds", upload},
                        {"load_seconds", std::chrono::duration<double>(t1 - t0).count()},
                        {"seconds", secs},
                        {"tokens_per_s", double(total) / secs},
                        {"peak_rss_gib", double(ru.ru_maxrss) / (1024.0 * 1024.0)},
                        {"checksum", checksum}};
    std::printf("%s\n", j.dump().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_hidden: %s\n", e.what());
    return 2;
  }
  return 0;
}
