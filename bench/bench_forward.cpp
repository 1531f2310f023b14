// Times one trace (forward pass + statistics) of a checkpoint and prints one JSON line:
//   bench_forward MODEL_DIR [--dtype bf16] [--attention eager] [--tokens 4] [--repeat 1]
// with the wall time per run, the weight bytes streamed per second and the peak RSS
// (getrusage). Token ids are 1..T (any ids below the vocabulary size would do).
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "numerics/parallel.hpp"
#include "tools/trace.hpp"

int main(int argc, char** argv) {
  using namespace nanscope;
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: %s MODEL_DIR [--dtype bf16|fp16|fp32] [--attention eager|fused] "
                 "[--tokens T] [--repeat N]\n",
                 argv[0]);
    return 2;
  }
  TraceOptions opt;
  int64_t tokens = 4;
  int repeat = 1;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--dtype" && parse_run_dtype(v))
      opt.dtype = *parse_run_dtype(v);
    else if (k == "--attention" && parse_attention(v))
      opt.attention = *parse_attention(v);
    else if (k == "--tokens")
      tokens = std::atoll(v.c_str());
    else if (k == "--repeat")
      repeat = std::atoi(v.c_str());
    else {
      std::fprintf(stderr, "unknown or bad option %s %s\n", k.c_str(), v.c_str());
      return 2;
    }
  }
  try {
    const Checkpoint ck = Checkpoint::open(argv[1]);
    for (int64_t t = 0; t < tokens; ++t) opt.ids.push_back(1 + t % (ck.config().vocab_size - 1));
    double best = 1e300, total = 0;
    TraceResult r;
    for (int i = 0; i < repeat; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      r = trace(ck, opt);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::min(best, s);
      total += s;
    }
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    const double bytes = double(ck.total_bytes());
    nlohmann::json j = {{"model", argv[1]},
                        {"dtype", run_dtype_name(opt.dtype)},
                        {"attention", attention_name(opt.attention)},
                        {"tokens", tokens},
                        {"threads", default_threads()},
                        {"repeat", repeat},
                        {"seconds_best", best},
                        {"seconds_mean", total / repeat},
                        {"weight_bytes", bytes},
                        {"weight_gb_per_s", bytes / best / 1e9},
                        {"peak_rss_mb", double(ru.ru_maxrss) / 1024.0},
                        {"finite", r.finite()}};
    std::printf("%s\n", j.dump().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_forward: %s\n", e.what());
    return 2;
  }
  return 0;
}
