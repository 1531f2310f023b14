#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/error.hpp"
#include "common/temp_files.hpp"
#include "cuda/forward_cuda.hpp"
#include "tools/hidden.hpp"
#include "tools/hidden_read.hpp"
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

// --merge-index: no model is run; the finished slices are read and one index written. (A
// template: the arguments are add_hidden's local struct.)
template <class Args>
Exit merge_index(const Args& m) {
  if (!m.model.empty() || !m.input.empty() || !m.shard.empty())
    fail("hidden --merge-index reads finished runs: it takes no MODEL, --input or --shard");
  std::vector<std::filesystem::path> dirs(m.merge_index.begin(), m.merge_index.end());
  if (m.out.empty() && dirs.size() > 1)
    fail("hidden --merge-index with {} directories: --out names where the merged index goes",
         dirs.size());
  const std::filesystem::path dest = m.out.empty() ? dirs.front() : std::filesystem::path(m.out);
  const HiddenSet set = HiddenSet::open(dirs);
  const nlohmann::json doc = write_merged_index(set, dest);
  const auto index = (dest / "index.json").string();
  if (m.json) {
    print_out(nlohmann::json{{"index", index},
                             {"inputs", set.entries().size()},
                             {"slices", doc["slices"]},
                             {"slice_count", set.slice_count()},
                             {"missing_slices", set.missing_slices()},
                             {"nonfinite", doc["nonfinite"]}}
                  .dump(2));
  } else {
    std::string s =
        fmt::format("{} inputs of {} director{} in input order: {}\n", set.entries().size(),
                    set.dirs().size(), set.dirs().size() == 1 ? "y" : "ies", index);
    if (!set.missing_slices().empty())
      s += fmt::format("Missing slices (not run or nothing finished yet): {} of {}\n",
                       fmt::join(set.missing_slices(), ", "), set.slice_count());
    if (!doc["nonfinite"].empty())
      s += fmt::format(
          "NaN/inf in the hidden states of {} input(s), listed under \"nonfinite\" "
          "in the index\n",
          doc["nonfinite"].size());
    print_out(s);
  }
  return set.missing_slices().empty() && doc["nonfinite"].empty() ? kClean : kProblem;
}

constexpr const char* kRequired =
    "hidden: MODEL, --input and --out are required (or --merge-index DIR... to read finished "
    "slices as one)";

}  // namespace

void add_hidden(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string model, input, out, tokenizer, layers = "all", pool = "none", dtype = "bf16",
                                              attention = "eager", out_dtype = "fp32", shard,
                                              adapter, device = "cpu", gpu_memory;
    std::vector<std::string> merge_index;
    int64_t batch_tokens = 4096;
    bool allow_unnormalized = false, json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "hidden",
      "Hidden states of many inputs (token ids, text, soft mixtures) into safetensors "
      "shards with an index; resumable");
  // MODEL, --input and --out are checked below: --merge-index needs neither MODEL nor --input.
  app->add_option("MODEL", a->model, "Checkpoint directory or Hugging Face hub id (Org/Name[@rev])")
      ->type_name("MODEL");
  app->add_option("--input", a->input,
                  "JSONL, one input per line: {\"id\", \"ids\"|\"text\"|\"soft\"} "
                  "(docs/hidden.md)")
      ->type_name("FILE");
  app->add_option("--out", a->out,
                  "Output directory (hidden-NNNNN.safetensors, index.json; with --shard, its "
                  "slice-K-of-N subdirectory; with --merge-index, where the merged index goes)")
      ->type_name("DIR");
  app->add_option("--shard", a->shard,
                  "K/N: only the K-th (0-based) of N slices of the input (inputs i with "
                  "i % N == K), into OUT/slice-K-of-N; for Slurm job arrays or one process per GPU")
      ->type_name("K/N");
  app->add_option("--merge-index", a->merge_index,
                  "DIR...: read the slices under DIR (or these output directories) as one and "
                  "write one index.json naming them all, in input order (into --out; default: "
                  "the one DIR)")
      ->type_name("DIR...");
  app->add_option("--layers", a->layers, "Hidden states to keep: all | 0,5,36 (-1 = last)")
      ->type_name("LIST")
      ->capture_default_str();
  app->add_option("--pool", a->pool, "none ([T, H] per state) | last | mean ([H])")
      ->type_name("POOL")
      ->capture_default_str();
  app->add_option("--dtype", a->dtype,
                  "fp32 | bf16 | fp16 (float32, bfloat16, float16, torch.* too) | auto (the "
                  "checkpoint's dtype)")
      ->type_name("DTYPE")
      ->capture_default_str();
  add_attention_option(app, a->attention);
  app->add_option("--device", a->device, "cpu | cuda (an NVIDIA GPU)")
      ->type_name("DEVICE")
      ->capture_default_str();
  app->add_option("--batch-tokens", a->batch_tokens,
                  "Run this many tokens through the model at a time, one shard each (bounds "
                  "memory)")
      ->type_name("N")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app->add_option("--out-dtype", a->out_dtype, "fp32 | run (the run dtype)")
      ->type_name("DTYPE")
      ->capture_default_str();
  app->add_option("--tokenizer", a->tokenizer, "tokenizer.json for \"text\" inputs")
      ->type_name("FILE");
  app->add_option("--adapter", a->adapter,
                  "PEFT adapter directory or hub id, applied unmerged as peft's PeftModel "
                  "computes it")
      ->type_name("DIR");
  app->add_flag("--allow-unnormalized", a->allow_unnormalized,
                "Accept soft probabilities that do not sum to 1 (used as given)");
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_gpu_memory_option(app, a->gpu_memory);
  add_threads_option(app, a->threads, " of the forward passes");
  describe(app,
           "  nanscope hidden Qwen/Qwen3-4B --input prompts.jsonl --out states/ --layers -1 "
           "--pool last\n"
           "  nanscope hidden ./merged --input soft.jsonl --out states/ --dtype fp32 --json\n",
           "0 every state finite, 1 some state holds NaN/inf (listed per input and layer)");
  out.push_back({app, [a] {
                   if (!a->merge_index.empty()) return merge_index(*a);
                   if (a->model.empty() || a->input.empty() || a->out.empty())
                     throw InputError(kRequired);
                   apply_threads(a->threads);
                   HiddenRunOptions opt;
                   const std::string model = model_path(a->model);
                   const DType dt = parse_run_dtype_flag("--dtype", a->dtype, model);
                   const AttentionProfile at = parse_attention_flag(a->attention);
                   auto pool = parse_pool(a->pool);
                   if (!pool) fail_usage("--pool {}: expected none, last or mean", a->pool);
                   if (a->out_dtype != "fp32" && a->out_dtype != "run")
                     fail_usage("--out-dtype {}: expected fp32 or run", a->out_dtype);
                   opt.model = model;
                   opt.input = a->input;
                   opt.out = a->out;
                   opt.tokenizer = a->tokenizer;
                   opt.layers = a->layers;
                   opt.pool = *pool;
                   opt.fwd.dtype = dt;
                   opt.fwd.attention = at;
                   if (!a->adapter.empty()) opt.adapter = model_path(a->adapter);
                   opt.fwd.device = parse_device_flag(a->device);
                   apply_gpu_memory(a->gpu_memory, opt.fwd.device == Device::Cuda);
                   opt.out_run_dtype = a->out_dtype == "run";
                   opt.batch_tokens = a->batch_tokens;
                   opt.rules.allow_unnormalized = a->allow_unnormalized;
                   if (!a->shard.empty()) opt.shard = parse_slice(a->shard);
                   ProgressBar bar;
                   if (isatty(STDERR_FILENO)) opt.progress = std::ref(bar);
                   // Ctrl-C: what is complete (and listed in the index) stays; a rerun resumes.
                   const auto dir = opt.shard ? opt.out / slice_dir_name(*opt.shard) : opt.out;
                   const std::string index = (dir / "index.json").string();
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
