#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/error.hpp"
#include "tools/trace.hpp"

namespace nanscope::cli {

void add_trace(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string model, ids, text, tokenizer, dtype = "bf16", attention = "eager", save;
    bool json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "trace",
      "Run the model as transformers does in a dtype; report every hidden state and the "
      "first op that produced inf/NaN");
  app->add_option("MODEL", a->model, "Hugging Face checkpoint directory or hub id")
      ->type_name("DIR")
      ->required();
  app->add_option("--ids", a->ids, "Token ids, comma-separated")->type_name("LIST");
  app->add_option("--text", a->text, "Text, tokenized with MODEL/tokenizer.json")->type_name("STR");
  app->add_option("--tokenizer", a->tokenizer, "tokenizer.json to use for --text")
      ->type_name("FILE");
  app->add_option("--dtype", a->dtype,
                  "fp32 | bf16 | fp16 (float32, bfloat16, float16, torch.* too) | auto (the "
                  "checkpoint's dtype)")
      ->type_name("DTYPE")
      ->capture_default_str();
  app->add_option("--attention", a->attention,
                  "eager (transformers' eager attention) | fused, also spelled sdpa (scores and "
                  "softmax in fp32, as SDPA / flash / SGLang)")
      ->type_name("PROFILE")
      ->capture_default_str();
  app->add_option("--save", a->save, "Write hidden.0..N, logits, input_ids to a safetensors file")
      ->type_name("FILE");
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_threads_option(app, a->threads, " of the forward pass");
  describe(app,
           "  nanscope trace ./merged --text \"Hello, world!\" --dtype fp16\n"
           "  nanscope trace Qwen/Qwen3-4B --ids 9707,11,1879,0 --attention sdpa --json\n",
           "0 every state finite, 1 a state or the logits hold NaN/inf");
  out.push_back({app, [a] {
                   apply_threads(a->threads);
                   TraceOptions opt;
                   const std::string model = model_path(a->model);
                   opt.dtype = parse_run_dtype_flag("--dtype", a->dtype, model);
                   auto at = parse_attention(a->attention);
                   if (!at)
                     fail_usage("--attention {}: expected eager, or fused (also spelled sdpa)",
                                a->attention);
                   opt.attention = *at;
                   if (!a->save.empty()) opt.save = a->save;
                   Checkpoint ck = Checkpoint::open(model);
                   opt.ids = resolve_tokens(model, a->ids, a->text, a->tokenizer);
                   TraceResult r = trace(ck, opt);
                   print_out(a->json ? trace_json(r).dump(2) : trace_text(r));
                   return r.finite() ? kClean : kProblem;
                 }});
}

}  // namespace nanscope::cli
