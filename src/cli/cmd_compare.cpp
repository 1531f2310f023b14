#include <fmt/format.h>

#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/error.hpp"
#include "tools/compare.hpp"
#include "tools/trace.hpp"

namespace nanscope::cli {

void add_compare(CLI::App& root, std::vector<Command>& out) {
  struct Side {
    std::string model, adapter, dtype, attention;
  };
  struct Args {
    Side a, b;
    std::string dtype = "bf16", attention = "eager", ids, text, tokenizer;
    int64_t generate = 0;
    bool json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "compare",
      "Run A and B on the same input and report how far apart they are, layer by layer "
      "(merged vs base + adapter, fp16 vs fp32, eager vs fused, base vs fine-tune)");
  app->add_option("A", a->a.model, "Checkpoint directory")->required();
  app->add_option("B", a->b.model, "Checkpoint directory (may be A itself)")->required();
  app->add_option("--adapter-a", a->a.adapter, "PEFT adapter applied unmerged to A");
  app->add_option("--adapter-b", a->b.adapter, "PEFT adapter applied unmerged to B");
  app->add_option("--dtype", a->dtype, "Run dtype of both: fp32 | bf16 | fp16")
      ->capture_default_str();
  app->add_option("--dtype-a", a->a.dtype, "Run dtype of A (default: --dtype)");
  app->add_option("--dtype-b", a->b.dtype, "Run dtype of B (default: --dtype)");
  app->add_option("--attention", a->attention, "eager | fused (sdpa), both")->capture_default_str();
  app->add_option("--attention-a", a->a.attention, "Attention of A (default: --attention)");
  app->add_option("--attention-b", a->b.attention, "Attention of B (default: --attention)");
  app->add_option("--ids", a->ids, "Token ids, comma-separated");
  app->add_option("--text", a->text, "Text, tokenized with A's tokenizer.json");
  app->add_option("--tokenizer", a->tokenizer, "tokenizer.json to use for --text");
  app->add_option("--generate", a->generate, "Also decode N tokens greedily with each, side by side");
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_threads_option(app, a->threads, " of the forward passes");
  out.push_back({app, [a] {
                   apply_threads(a->threads);
                   Checkpoint ca = Checkpoint::open(a->a.model);
                   Checkpoint cb = Checkpoint::open(a->b.model);
                   auto side = [&](const Side& s, const Checkpoint& ck, const char* which) {
                     CompareSide cs;
                     cs.ck = &ck;
                     const std::string d = s.dtype.empty() ? a->dtype : s.dtype;
                     const std::string at = s.attention.empty() ? a->attention : s.attention;
                     const auto dt = parse_run_dtype(d);
                     if (!dt) fail("--dtype-{} {}: expected fp32, bf16 or fp16", which, d);
                     const auto ap = parse_attention(at);
                     if (!ap) fail("--attention-{} {}: expected eager or fused", which, at);
                     cs.dtype = *dt;
                     cs.attention = *ap;
                     if (!s.adapter.empty()) cs.adapter = AdapterOverlay::open(s.adapter, ck);
                     cs.label = fmt::format("{}{} {} {}", s.model,
                                            s.adapter.empty() ? "" : " + " + s.adapter + " (unmerged)",
                                            run_dtype_name(*dt), attention_name(*ap));
                     return cs;
                   };
                   const CompareSide sa = side(a->a, ca, "a"), sb = side(a->b, cb, "b");
                   if (a->generate < 0) fail("--generate {} is negative", a->generate);
                   const auto ids = resolve_tokens(a->a.model, a->ids, a->text, a->tokenizer);
                   const CompareResult r = compare(sa, sb, ids, a->generate);
                   print_out(a->json ? compare_json(r).dump(2) : compare_text(r));
                   return r.finite_a && r.finite_b ? kClean : kProblem;
                 }});
}

}  // namespace nanscope::cli
