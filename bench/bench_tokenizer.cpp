// Tokenizer load time and encode throughput, printed as one JSON object.
//
// usage: bench_tokenizer TOKENIZER_JSON_OR_DIR CORPUS.jsonl [--repeat N] [--threads T]
// The corpus is the goldens format (one {"text": ...} per line). Compare with the `tokenizers`
// library's numbers that tools/fixtures/make_tokenizer_goldens.py prints for the same files; the
// first pass over the corpus fills the word cache, later passes are the steady state.
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "tokenizer/bpe.hpp"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: %s TOKENIZER_JSON_OR_DIR CORPUS.jsonl [--repeat N] [--threads T]\n",
                 argv[0]);
    return 2;
  }
  int repeat = 5;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  for (int i = 3; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--repeat") == 0) repeat = std::max(1, std::atoi(argv[i + 1]));
    if (std::strcmp(argv[i], "--threads") == 0) threads = std::max(1, std::atoi(argv[i + 1]));
  }
  try {
    std::vector<std::string> texts;
    size_t bytes = 0;
    {
      std::ifstream in(argv[2]);
      if (!in) throw std::runtime_error(std::string("cannot read ") + argv[2]);
      std::string line;
      while (std::getline(in, line)) {
        if (line.empty()) continue;
        texts.push_back(nlohmann::json::parse(line).at("text").get<std::string>());
        bytes += texts.back().size();
      }
    }

    auto t0 = std::chrono::steady_clock::now();
    const nanscope::Tokenizer tok = nanscope::Tokenizer::load(argv[1]);
    const double load_s = seconds_since(t0);

    // Cold pass: every word goes through the merge loop once.
    size_t tokens = 0;
    t0 = std::chrono::steady_clock::now();
    for (const auto& t : texts) tokens += tok.encode(t).size();
    const double cold_s = seconds_since(t0);

    t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < repeat; ++r) {
      for (const auto& t : texts) tokens += tok.encode(t).size();
    }
    const double warm_s = seconds_since(t0) / repeat;
    tokens /= static_cast<size_t>(repeat + 1);

    t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < repeat; ++r) tok.encode_batch(texts, threads);
    const double batch_s = seconds_since(t0) / repeat;

    const double mb = static_cast<double>(bytes) / 1e6;
    nlohmann::json out = {
        {"implementation", "nanscope"},
        {"tokenizer", argv[1]},
        {"corpus", argv[2]},
        {"texts", texts.size()},
        {"bytes", bytes},
        {"tokens", tokens},
        {"load_s", load_s},
        {"single",
         {{"cold_MB_per_s", mb / cold_s},
          {"MB_per_s", mb / warm_s},
          {"tokens_per_s", static_cast<double>(tokens) / warm_s}}},
        {"batch",
         {{"threads", threads},
          {"MB_per_s", mb / batch_s},
          {"tokens_per_s", static_cast<double>(tokens) / batch_s}}},
    };
    std::cout << out.dump(2) << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_tokenizer: %s\n", e.what());
    return 1;
  }
  return 0;
}
