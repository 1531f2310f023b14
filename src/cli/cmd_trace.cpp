#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "cuda/forward_cuda.hpp"
#include "tools/trace.hpp"

namespace nanscope::cli {

void add_trace(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string model, ids, text, tokenizer, dtype = "bf16", attention = "eager", save, adapter,
                                             device = "cpu", gpu_memory;
    bool json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "trace",
      "Run the model as transformers does in a dtype; report every hidden state and the "
      "first op that produced inf/NaN");
  add_model_arg(app, a->model);
  add_token_options(app, a->ids, a->text, a->tokenizer,
                    "Text, tokenized with MODEL/tokenizer.json");
  app->add_option("--dtype", a->dtype,
                  "fp32 | bf16 | fp16 (float32, bfloat16, float16, torch.* too) | auto (the "
                  "checkpoint's dtype)")
      ->type_name("DTYPE")
      ->capture_default_str();
  add_attention_option(app, a->attention);
  app->add_option("--adapter", a->adapter,
                  "PEFT adapter directory or hub id, applied unmerged as peft's PeftModel "
                  "computes it")
      ->type_name("DIR");
  app->add_option("--device", a->device, "cpu | cuda (an NVIDIA GPU)")
      ->type_name("DEVICE")
      ->capture_default_str();
  app->add_option("--save", a->save, "Write hidden.0..N, logits, input_ids to a safetensors file")
      ->type_name("FILE");
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_gpu_memory_option(app, a->gpu_memory);
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
                   opt.attention = parse_attention_flag(a->attention);
                   opt.device = parse_device_flag(a->device);
                   apply_gpu_memory(a->gpu_memory, opt.device == Device::Cuda);
                   if (!a->save.empty()) {
                     check_writable(a->save, "--save");  // now, not after the forward pass
                     opt.save = a->save;
                   }
                   Checkpoint ck = Checkpoint::open(model);
                   if (!a->adapter.empty())
                     opt.adapter = AdapterOverlay::open(model_path(a->adapter), ck);
                   opt.ids = resolve_tokens(model, a->ids, a->text, a->tokenizer);
                   TraceResult r = trace(ck, opt);
                   print_out(a->json ? trace_json(r).dump(2) : trace_text(r));
                   return r.finite() ? kClean : kProblem;
                 }});
}

}  // namespace nanscope::cli
