// Times one `nanscope merge` and reports peak memory, to check that the merge streams (peak RSS
// independent of model size) on a real-sized checkpoint (e.g. Qwen3-4B + a rank-64 adapter):
//
//   bench_merge --base DIR --adapter DIR [--out DIR] [--dtype auto|bf16|fp16|fp32] [--threads N]
//
// Prints one JSON object on stdout. Without --out the merged model goes to a temporary directory
// that is removed afterwards.
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>

#include "common/error.hpp"
#include "tools/merge.hpp"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  nanscope::MergeOptions o;
  bool keep = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "bench_merge: " << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--base") {
      o.base = next();
    } else if (a == "--adapter") {
      o.adapter = next();
    } else if (a == "--out") {
      o.out = next();
      keep = true;
    } else if (a == "--dtype") {
      o.dtype = nanscope::parse_merge_dtype(next());
    } else if (a == "--threads") {
      o.threads = std::stoi(next());
    } else {
      std::cerr << "usage: bench_merge --base DIR --adapter DIR [--out DIR] [--dtype D] "
                   "[--threads N]\n";
      return 2;
    }
  }
  if (o.base.empty() || o.adapter.empty()) {
    std::cerr << "bench_merge: --base and --adapter are required\n";
    return 2;
  }
  if (o.out.empty())
    o.out = fs::temp_directory_path() / ("nanscope-bench-merge-" + std::to_string(::getpid()));
  try {
    nanscope::MergeResult r = nanscope::merge(o);
    struct rusage ru {};
    getrusage(RUSAGE_SELF, &ru);
    nlohmann::json j;
    j["seconds"] = r.seconds;
    j["peak_rss_mib"] = double(ru.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
    j["bytes_written"] = r.bytes_written;
    j["gib_per_second"] = r.seconds > 0 ? double(r.bytes_written) / r.seconds / (1 << 30) : 0.0;
    j["threads"] = o.threads;
    j["result"] = nanscope::merge_result_json(r);
    std::cout << j.dump(2) << "\n";
    if (!keep) {
      std::error_code ec;
      fs::remove_all(o.out, ec);
    }
    return r.refused ? 1 : 0;
  } catch (const std::exception& e) {
    std::cerr << "bench_merge: " << e.what() << "\n";
    return 2;
  }
}
