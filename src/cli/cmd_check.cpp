#include <filesystem>
#include <sstream>

#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "tools/check.hpp"

namespace nanscope::cli {

namespace {
// Used when neither --ids nor --text is given: plain English that every Qwen/Llama vocabulary
// covers, long enough to exercise attention across positions.
constexpr const char* kDefaultPrompt = "Hello, world! The quick brown fox jumps over the lazy dog.";

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
    std::string model, base, adapter, ids, text, tokenizer, dtypes = "bf16,fp16",
                                                            attention = "eager", report;
    bool json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "check",
      "The verdict: PASS or FAIL with the root cause (scan + traces in fp32 and each "
      "dtype; with --base/--adapter, where the NaN was born)");
  app->add_option("MODEL", a->model, "Hugging Face checkpoint directory")->required();
  app->add_option("--base", a->base, "The base checkpoint the model was merged from");
  app->add_option("--adapter", a->adapter, "The PEFT adapter that was merged in");
  app->add_option("--ids", a->ids, "Token ids, comma-separated");
  app->add_option("--text", a->text, "Text, tokenized with MODEL/tokenizer.json");
  app->add_option("--tokenizer", a->tokenizer, "tokenizer.json to use for --text");
  app->add_option("--dtype", a->dtypes, "Run dtypes besides the fp32 reference, comma-separated")
      ->capture_default_str();
  app->add_option("--attention", a->attention,
                  "eager | fused | both (with eager, a run that fails inside attention is also "
                  "run fused)")
      ->capture_default_str();
  app->add_option("--report", a->report, "Write a self-contained HTML report");
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_threads_option(app, a->threads, " for scanning and the forward passes");
  out.push_back({app, [a] {
                   CheckOptions opt;
                   opt.dtypes.clear();
                   std::stringstream ss(a->dtypes);
                   for (std::string d; std::getline(ss, d, ',');) {
                     auto dt = parse_run_dtype(d);
                     if (!dt) fail("--dtype {}: expected a list of fp32, bf16, fp16", a->dtypes);
                     opt.dtypes.push_back(*dt);
                   }
                   if (a->attention == "both")
                     opt.attentions = {AttentionProfile::Eager, AttentionProfile::Fused};
                   else if (auto at = parse_attention(a->attention))
                     opt.attentions = {*at};
                   else
                     fail("--attention {}: expected eager, fused or both", a->attention);
                   if (!a->base.empty()) opt.base = a->base;
                   if (!a->adapter.empty()) opt.adapter = a->adapter;
                   opt.threads = apply_threads(a->threads);
                   const bool has_tok =
                       !a->tokenizer.empty() ||
                       std::filesystem::exists(std::filesystem::path(a->model) / "tokenizer.json");
                   if (a->ids.empty() && a->text.empty() && !has_tok)
                     opt.ids = {1, 2, 3, 4, 5, 6, 7, 8};  // no tokenizer: small ids every vocab has
                   else
                     opt.ids =
                         resolve_tokens(a->model, a->ids, a->text, a->tokenizer, kDefaultPrompt);
                   opt.prompt =
                       a->ids.empty() && a->text.empty() && has_tok ? kDefaultPrompt : a->text;
                   if (!a->report.empty())
                     check_writable(a->report, "--report");  // before the runs
                   return finish(check(a->model, opt), a->report, a->json);
                 }});
}

}  // namespace nanscope::cli
