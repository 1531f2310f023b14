#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/error.hpp"
#include "cuda/forward_cuda.hpp"
#include "tools/generate.hpp"
#include "tools/trace.hpp"

namespace nanscope::cli {

void add_generate(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string model, adapter, ids, text, tokenizer,
        dtype = "bf16", attention = "eager", eos, weights = "resident", device = "cpu", gpu_memory;
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
  add_model_arg(app, a->model);
  app->add_option("--adapter", a->adapter,
                  "PEFT adapter directory or hub id, applied unmerged as peft's PeftModel "
                  "computes it")
      ->type_name("DIR");
  add_token_options(app, a->ids, a->text, a->tokenizer,
                    "Prompt text, tokenized with MODEL/tokenizer.json");
  app->add_option("--max-new-tokens", a->max_new_tokens, "New tokens at most")
      ->type_name("N")
      ->capture_default_str();
  app->add_option("--dtype", a->dtype,
                  "fp32 | bf16 | fp16 (float32, bfloat16, float16, torch.* too) | auto (the "
                  "checkpoint's dtype)")
      ->type_name("DTYPE")
      ->capture_default_str();
  add_attention_option(app, a->attention);
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
  app->add_option("--device", a->device,
                  "cpu | cuda (an NVIDIA GPU: the layers and the key/value cache there)")
      ->type_name("DEVICE")
      ->capture_default_str();
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_gpu_memory_option(app, a->gpu_memory);
  add_threads_option(app, a->threads, " of the forward pass");
  describe(
      app,
      "  nanscope generate ./merged --text \"The capital of France is\" --max-new-tokens 16\n"
      "  nanscope generate Qwen/Qwen3-4B --adapter ./my-lora --text \"Hi\" --dtype bf16 --json\n",
      "0 every step's logits finite, 1 a step's logits held NaN/inf (the run stops there)");
  out.push_back({app, [a] {
                   apply_threads(a->threads);
                   GenerateOptions opt;
                   const std::string model = model_path(a->model);
                   opt.dtype = parse_run_dtype_flag("--dtype", a->dtype, model);
                   opt.attention = parse_attention_flag(a->attention);
                   opt.max_new_tokens = a->max_new_tokens;
                   if (a->weights != "resident" && a->weights != "mapped")
                     fail_usage("--weights {}: expected resident or mapped", a->weights);
                   opt.resident = a->weights == "resident";
                   opt.device = parse_device_flag(a->device);
                   apply_gpu_memory(a->gpu_memory, opt.device == Device::Cuda);
                   opt.temperature = a->temperature;
                   opt.top_k = a->top_k;
                   opt.top_p = a->top_p;
                   opt.seed = a->seed;
                   if (a->eos == "none")
                     opt.eos = std::vector<int64_t>{};  // run to --max-new-tokens
                   else if (!a->eos.empty())
                     opt.eos = parse_ids(a->eos);
                   Checkpoint ck = Checkpoint::open(model);
                   if (!a->adapter.empty())
                     opt.adapter = AdapterOverlay::open(model_path(a->adapter), ck);
                   opt.prompt = resolve_tokens(model, a->ids, a->text, a->tokenizer);
                   const GenerateResult r = generate(ck, opt);
                   print_out(a->json ? generate_json(r).dump(2) : generate_text(r));
                   return r.finite() ? kClean : kProblem;
                 }});
}

}  // namespace nanscope::cli
