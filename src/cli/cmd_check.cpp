#include <algorithm>
#include <filesystem>

#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/strings.hpp"
#include "cuda/forward_cuda.hpp"
#include "tools/check.hpp"

namespace nanscope::cli {

namespace {
// The report first (nothing else can fail before it); stdout says where it went. A report that
// fails to write after all still leaves the finished verdict printed, then exit 2.
int finish(const CheckResult& r, const std::string& report, bool json) {
  std::string error, where;
  if (!report.empty()) {
    where = std::filesystem::absolute(report).lexically_normal().string();
    try {
      write_file_atomic(report, check_html(r));
    } catch (const OutputError& e) {
      error = e.what();
    }
  }
  if (json) {
    nlohmann::json j = check_json(r);
    if (!where.empty()) j["report"] = error.empty() ? nlohmann::json(where) : nlohmann::json();
    print_out(j.dump(2));
  } else {
    print_out(check_text(r) + (where.empty() || !error.empty() ? "" : "\nReport: " + where + "\n"));
  }
  if (error.empty()) return r.pass() ? kClean : kProblem;
  fmt::print(stderr, "nanscope: cannot write output: {} (the verdict above is complete)\n", error);
  return kBadInput;
}

}  // namespace

void add_check(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string model, base, adapter, ids, text, tokenizer,
        dtypes = "bf16,fp16", attention = "eager", report, device = "cpu", gpu_memory;
    bool json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "check",
      "The verdict: PASS or FAIL with the root cause (scan + traces in fp32 and each "
      "dtype; with --base/--adapter, where the NaN was born)");
  add_model_arg(app, a->model);
  app->add_option("--base", a->base, "The base checkpoint the model was merged from")
      ->type_name("DIR");
  app->add_option("--adapter", a->adapter, "The PEFT adapter that was merged in")->type_name("DIR");
  add_token_options(app, a->ids, a->text, a->tokenizer,
                    "Text, tokenized with MODEL/tokenizer.json (default: an English prompt whose "
                    "ids fit the vocabulary; the verdict says which)");
  app->add_option("--dtype", a->dtypes,
                  "Run dtypes besides the fp32 reference, comma-separated, each once: fp32, bf16, "
                  "fp16 (float32, bfloat16, float16, torch.* too), auto (the checkpoint's)")
      ->type_name("LIST")
      ->capture_default_str();
  add_attention_option(app, a->attention,
                       " | both (with eager, a run that fails inside attention is also run fused)");
  app->add_option("--report", a->report, "Write a self-contained HTML report")->type_name("FILE");
  app->add_option("--device", a->device,
                  "cpu | cuda (an NVIDIA GPU: the model's runs; an adapter applied unmerged and "
                  "the divergence figures stay on the CPU)")
      ->type_name("DEVICE")
      ->capture_default_str();
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_gpu_memory_option(app, a->gpu_memory);
  add_threads_option(app, a->threads, " for scanning and the forward passes");
  describe(app,
           "  nanscope check ./merged\n"
           "  nanscope check ./merged --base Qwen/Qwen3-4B --adapter ./my-lora --report r.html\n"
           "  nanscope check ./merged --text \"Hello, world!\" --dtype fp16 --json | jq .verdict\n",
           "0 PASS, 1 FAIL (the causes and their fixes are printed)");
  out.push_back({app, [a] {
                   CheckOptions opt;
                   const std::string model = model_path(a->model);
                   opt.dtypes.clear();
                   for (const std::string& d : split_list("--dtype", a->dtypes)) {
                     const DType dt = parse_run_dtype_flag("--dtype", d, model);
                     if (std::count(opt.dtypes.begin(), opt.dtypes.end(), dt))
                       fail_usage("--dtype {}: {} is listed twice", a->dtypes, run_dtype_name(dt));
                     opt.dtypes.push_back(dt);
                   }
                   if (ascii_lower(a->attention) == "both")
                     opt.attentions = {AttentionProfile::Eager, AttentionProfile::Fused};
                   else
                     opt.attentions = {parse_attention_flag(a->attention, " or both")};
                   if (!a->base.empty()) opt.base = model_path(a->base);
                   if (!a->adapter.empty()) opt.adapter = model_path(a->adapter);
                   opt.threads = apply_threads(a->threads);
                   opt.device = parse_device_flag(a->device);
                   apply_gpu_memory(a->gpu_memory, opt.device == Device::Cuda);
                   if (a->ids.empty() && a->text.empty()) {
                     CheckInput in = default_check_input(model, a->tokenizer);
                     opt.ids = std::move(in.ids);
                     opt.prompt = std::move(in.prompt);
                   } else {
                     opt.ids = resolve_tokens(model, a->ids, a->text, a->tokenizer);
                     opt.prompt = a->ids.empty() ? "text \"" + a->text + "\"" : "ids given";
                   }
                   if (!a->report.empty())
                     check_writable(a->report, "--report");  // before the runs
                   return finish(check(model, opt), a->report, a->json);
                 }});
}

}  // namespace nanscope::cli
