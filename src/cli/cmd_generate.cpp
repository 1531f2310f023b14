#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/error.hpp"
#include "tools/generate.hpp"
#include "tools/trace.hpp"

namespace nanscope::cli {

void add_generate(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string model, adapter, ids, text, tokenizer, dtype = "bf16", attention = "eager", eos,
        weights = "resident";
    int64_t max_new_tokens = 32, top_k = 0;
    double temperature = 0.0, top_p = 1.0;
    uint64_t seed = 0;
    bool json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "generate",
      "Greedy decoding with a key/value cache, token for token as transformers' "
      "generate(do_sample=False); exit 1 when a step's logits are not finite");
  app->add_option("MODEL", a->model, "Hugging Face checkpoint directory")->required();
  app->add_option("--adapter", a->adapter,
                  "PEFT adapter directory, applied unmerged as peft's PeftModel computes it");
  app->add_option("--ids", a->ids, "Prompt token ids, comma-separated");
  app->add_option("--text", a->text, "Prompt text, tokenized with MODEL/tokenizer.json");
  app->add_option("--tokenizer", a->tokenizer, "tokenizer.json to use for --text");
  app->add_option("--max-new-tokens", a->max_new_tokens, "New tokens at most")
      ->capture_default_str();
  app->add_option("--dtype", a->dtype, "fp32 | bf16 | fp16")->capture_default_str();
  app->add_option("--attention", a->attention, "eager | fused (sdpa)")->capture_default_str();
  app->add_option("--eos", a->eos,
                  "Stop ids, comma-separated, or none (default: generation_config.json's "
                  "eos_token_id)");
  app->add_option("--temperature", a->temperature,
                  "0: greedy; > 0: sample (nanscope's random numbers, not torch's)")
      ->capture_default_str();
  app->add_option("--top-k", a->top_k, "Sample among the k most likely tokens (0: all)")
      ->capture_default_str();
  app->add_option("--top-p", a->top_p, "Sample within the nucleus of this probability")
      ->capture_default_str();
  app->add_option("--seed", a->seed, "Seed of the sampler")->capture_default_str();
  app->add_option("--weights", a->weights,
                  "resident: copied once into memory of their own (fastest decoding) | mapped: "
                  "read from the files at every step (no second copy)")
      ->capture_default_str();
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_threads_option(app, a->threads, " of the forward pass");
  out.push_back({app, [a] {
                   apply_threads(a->threads);
                   GenerateOptions opt;
                   auto dt = parse_run_dtype(a->dtype);
                   if (!dt) fail("--dtype {}: expected fp32, bf16 or fp16", a->dtype);
                   auto at = parse_attention(a->attention);
                   if (!at) fail("--attention {}: expected eager or fused", a->attention);
                   opt.dtype = *dt;
                   opt.attention = *at;
                   opt.max_new_tokens = a->max_new_tokens;
                   if (a->weights != "resident" && a->weights != "mapped")
                     fail("--weights {}: expected resident or mapped", a->weights);
                   opt.resident = a->weights == "resident";
                   opt.temperature = a->temperature;
                   opt.top_k = a->top_k;
                   opt.top_p = a->top_p;
                   opt.seed = a->seed;
                   if (a->eos == "none")
                     opt.eos = std::vector<int64_t>{};  // run to --max-new-tokens
                   else if (!a->eos.empty())
                     opt.eos = parse_ids(a->eos);
                   Checkpoint ck = Checkpoint::open(a->model);
                   if (!a->adapter.empty()) opt.adapter = AdapterOverlay::open(a->adapter, ck);
                   opt.prompt = resolve_tokens(a->model, a->ids, a->text, a->tokenizer);
                   const GenerateResult r = generate(ck, opt);
                   print_out(a->json ? generate_json(r).dump(2) : generate_text(r));
                   return r.finite() ? kClean : kProblem;
                 }});
}

}  // namespace nanscope::cli
