#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "cli/commands.hpp"
#include "common/error.hpp"
#include "common/temp_files.hpp"
#include "cuda/forward_cuda.hpp"
#include "tools/hidden.hpp"
#include "tools/trace.hpp"

namespace nanscope::cli {

namespace {

// A one-line progress bar on stderr (only when stderr is a terminal): inputs, tokens/s, ETA.
class ProgressBar {
 public:
  void operator()(int64_t done, int64_t total, int64_t tokens, int64_t total_tokens) {
    const auto now = std::chrono::steady_clock::now();
    const double secs = std::chrono::duration<double>(now - start_).count();
    if (done < total && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    const double rate = secs > 0 ? double(tokens) / secs : 0;
    const double eta = rate > 0 ? double(total_tokens - tokens) / rate : 0;
    const int width = 30;
    const int filled = total > 0 ? int(width * done / total) : width;
    fmt::print(stderr, "\r[{:=<{}}{: <{}}] {}/{} inputs  {:.0f} tok/s  ETA {:.0f}s   ", "", filled,
               "", width - filled, done, total, rate, eta);
    if (done == total) fmt::print(stderr, "\n");
    std::fflush(stderr);
  }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now(), last_{};
};

}  // namespace

void add_hidden(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string model, input, out, tokenizer, layers = "all", pool = "none", dtype = "bf16",
                                              attention = "eager", out_dtype = "fp32",
                                              device = "cpu";
    int64_t batch_tokens = 4096;
    bool allow_unnormalized = false, json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "hidden",
      "Hidden states of many inputs (token ids, text, soft mixtures) into safetensors "
      "shards with an index; resumable");
  app->add_option("MODEL", a->model, "Hugging Face checkpoint directory")->required();
  app->add_option("--input", a->input,
                  "JSONL, one input per line: {\"id\", \"ids\"|\"text\"|\"soft\"} "
                  "(docs/hidden.md)")
      ->required();
  app->add_option("--out", a->out, "Output directory (hidden-NNNNN.safetensors, index.json)")
      ->required();
  app->add_option("--layers", a->layers, "Hidden states to keep: all | 0,5,36 (-1 = last)")
      ->capture_default_str();
  app->add_option("--pool", a->pool, "none ([T, H] per state) | last | mean ([H])")
      ->capture_default_str();
  app->add_option("--dtype", a->dtype, "fp32 | bf16 | fp16")->capture_default_str();
  app->add_option("--attention", a->attention, "eager | fused")->capture_default_str();
  app->add_option("--device", a->device, "cpu | cuda (an NVIDIA GPU)")->capture_default_str();
  app->add_option("--batch-tokens", a->batch_tokens,
                  "Write a shard once it holds this many tokens (bounds memory)")
      ->capture_default_str();
  app->add_option("--out-dtype", a->out_dtype, "fp32 | run (the run dtype)")->capture_default_str();
  app->add_option("--tokenizer", a->tokenizer, "tokenizer.json for \"text\" inputs");
  app->add_flag("--allow-unnormalized", a->allow_unnormalized,
                "Accept soft probabilities that do not sum to 1 (used as given)");
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_threads_option(app, a->threads, " of the forward passes");
  out.push_back({app, [a] {
                   apply_threads(a->threads);
                   HiddenRunOptions opt;
                   auto dt = parse_run_dtype(a->dtype);
                   if (!dt) fail("--dtype {}: expected fp32, bf16 or fp16", a->dtype);
                   auto at = parse_attention(a->attention);
                   if (!at) fail("--attention {}: expected eager or fused", a->attention);
                   auto pool = parse_pool(a->pool);
                   if (!pool) fail("--pool {}: expected none, last or mean", a->pool);
                   if (a->out_dtype != "fp32" && a->out_dtype != "run")
                     fail("--out-dtype {}: expected fp32 or run", a->out_dtype);
                   opt.model = a->model;
                   opt.input = a->input;
                   opt.out = a->out;
                   opt.tokenizer = a->tokenizer;
                   opt.layers = a->layers;
                   opt.pool = *pool;
                   opt.fwd.dtype = *dt;
                   opt.fwd.attention = *at;
                   opt.fwd.device = parse_device_flag(a->device);
                   opt.out_run_dtype = a->out_dtype == "run";
                   opt.batch_tokens = a->batch_tokens;
                   opt.rules.allow_unnormalized = a->allow_unnormalized;
                   ProgressBar bar;
                   if (isatty(STDERR_FILENO)) opt.progress = std::ref(bar);
                   // Ctrl-C: what is complete (and listed in the index) stays; a rerun resumes.
                   const std::string index = (opt.out / "index.json").string();
                   set_interrupt_note(fmt::format(
                       "hidden: no shard was completed by this run; rerun the same command to "
                       "resume from {}",
                       index));
                   opt.on_shard = [index](const HiddenRunSummary& s, int64_t) {
                     set_interrupt_note(fmt::format(
                         "hidden: {} input(s) complete in {} shard(s) of this run ({}{}), listed "
                         "in {}; rerun the same command to resume",
                         s.written, s.shards.size(), s.shards.front(),
                         s.shards.size() > 1 ? " to " + s.shards.back() : "", index));
                   };
                   HiddenRunSummary r = run_hidden(opt);
                   print_out(a->json ? hidden_summary_json(r).dump(2) : hidden_summary_text(r));
                   return r.clean() ? kClean : kProblem;
                 }});
}

}  // namespace nanscope::cli
