#include <fmt/format.h>
#include <unistd.h>

#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/error.hpp"
#include "common/strings.hpp"
#include "common/temp_files.hpp"
#include "tools/merge.hpp"

namespace nanscope::cli {

namespace {

uint64_t parse_size(const std::string& s) {
  if (s.empty()) return 0;
  const std::optional<uint64_t> v = parse_byte_size(s);
  if (!v) fail_usage("--max-shard-size {}: expected a size like 5GB or 500MB", s);
  return *v;
}
}  // namespace

void add_merge(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string base, adapter, out, dtype = "auto", max_shard;
    bool allow_nonfinite = false, json = false, peft_tied = false;
    int threads = 0;
    bool no_fsync = false;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "merge",
      "Merge a PEFT LoRA adapter exactly as peft does, with fp32 arithmetic, into a "
      "checkpoint transformers loads; refuse to write NaN/inf");
  app->add_option("--base", a->base, "Base checkpoint directory or hub id")
      ->type_name("DIR")
      ->required();
  app->add_option("--adapter", a->adapter, "PEFT adapter directory or hub id")
      ->type_name("DIR")
      ->required();
  app->add_option("--out", a->out, "Output directory (must not exist or be empty)")
      ->type_name("DIR")
      ->required();
  app->add_option("--dtype", a->dtype,
                  "auto (the base's) | bf16 | fp16 | fp32 (float32, bfloat16, float16, torch.* "
                  "too)")
      ->type_name("DTYPE")
      ->capture_default_str();
  app->add_flag("--allow-nonfinite", a->allow_nonfinite,
                "Write even if merged weights hold NaN/inf");
  app->add_option("--max-shard-size", a->max_shard,
                  "Shard size (e.g. 5GB, 500MiB); default: shards like the base's")
      ->type_name("SIZE");
  app->add_flag("--peft-tied", a->peft_tied,
                "On a tied model, merge embedding/lm_head updates into the shared tensor and stay "
                "tied, byte for byte like peft (changes the model's function)");
  app->add_flag("--no-fsync", a->no_fsync,
                "Write through the page cache and leave the bytes to the kernel's writeback, as "
                "cp does, instead of fsyncing before the final rename (faster where the disk is "
                "the limit; a power cut soon after may leave a partial model)");
  add_threads_option(app, a->threads, "");
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  describe(app,
           "  nanscope merge --base Qwen/Qwen3-4B --adapter ./my-lora --out ./merged\n"
           "  nanscope merge --base ./base --adapter ./my-lora --out ./merged-fp32 --dtype fp32 "
           "--json\n",
           "0 the merged model was written, 1 refused: the merged weights would hold NaN/inf "
           "(the output names the fix; nothing is written)");
  out.push_back({app, [a] {
                   MergeOptions o;
                   o.base = model_path(a->base);
                   o.adapter = model_path(a->adapter);
                   o.out = a->out;
                   o.dtype = parse_merge_dtype(a->dtype);
                   o.allow_nonfinite = a->allow_nonfinite;
                   o.max_shard_size = parse_size(a->max_shard);
                   o.threads = apply_threads(a->threads);
                   o.durable = !a->no_fsync;
                   o.tied = a->peft_tied ? TiedMode::Peft : TiedMode::Untie;
                   // Ctrl-C: main.cpp's cleanup removes the temporary directory at once.
                   set_interrupt_note(fmt::format("merge: nothing was written to {}", a->out));
                   if (isatty(STDERR_FILENO))
                     o.progress = [](const std::string& name, size_t i, size_t n) {
                       fmt::print(stderr, "\r[{}/{}] {:<70.70}", i + 1, n, name);
                       if (i + 1 == n) fmt::print(stderr, "\n");
                     };
                   MergeResult r = merge(o);
                   set_interrupt_note(r.refused
                                          ? fmt::format("merge: nothing was written to {}", a->out)
                                          : fmt::format("merge: {} is complete", a->out));
                   print_out(a->json ? merge_result_json(r).dump(2) : merge_summary(r));
                   return r.refused ? kProblem : kClean;
                 }});
}

}  // namespace nanscope::cli
