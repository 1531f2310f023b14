#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/error.hpp"
#include "cuda/forward_cuda.hpp"
#include "tools/trace.hpp"

namespace nanscope::cli {

void add_trace(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string model, ids, text, tokenizer, dtype = "bf16", attention = "eager", save,
                                             device = "cpu";
    bool json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "trace",
      "Run the model as transformers does in a dtype; report every hidden state and the "
      "first op that produced inf/NaN");
  app->add_option("MODEL", a->model, "Hugging Face checkpoint directory")->required();
  app->add_option("--ids", a->ids, "Token ids, comma-separated");
  app->add_option("--text", a->text, "Text, tokenized with MODEL/tokenizer.json");
  app->add_option("--tokenizer", a->tokenizer, "tokenizer.json to use for --text");
  app->add_option("--dtype", a->dtype, "fp32 | bf16 | fp16")->capture_default_str();
  app->add_option("--attention", a->attention,
                  "eager (transformers' eager attention) | fused (scores and softmax in fp32, as "
                  "SDPA / flash / SGLang)")
      ->capture_default_str();
  app->add_option("--device", a->device, "cpu | cuda (an NVIDIA GPU)")->capture_default_str();
  app->add_option("--save", a->save, "Write hidden.0..N, logits, input_ids to a safetensors file");
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_threads_option(app, a->threads, " of the forward pass");
  out.push_back({app, [a] {
                   apply_threads(a->threads);
                   TraceOptions opt;
                   auto dt = parse_run_dtype(a->dtype);
                   if (!dt) fail("--dtype {}: expected fp32, bf16 or fp16", a->dtype);
                   auto at = parse_attention(a->attention);
                   if (!at) fail("--attention {}: expected eager or fused", a->attention);
                   opt.dtype = *dt;
                   opt.attention = *at;
                   opt.device = parse_device_flag(a->device);
                   if (!a->save.empty()) opt.save = a->save;
                   Checkpoint ck = Checkpoint::open(a->model);
                   opt.ids = resolve_tokens(a->model, a->ids, a->text, a->tokenizer);
                   TraceResult r = trace(ck, opt);
                   print_out(a->json ? trace_json(r).dump(2) : trace_text(r));
                   return r.finite() ? kClean : kProblem;
                 }});
}

}  // namespace nanscope::cli
