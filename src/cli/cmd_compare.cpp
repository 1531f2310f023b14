#include <fmt/format.h>

#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "common/error.hpp"
#include "cuda/forward_cuda.hpp"
#include "tools/compare.hpp"
#include "tools/trace.hpp"

namespace nanscope::cli {

void add_compare(CLI::App& root, std::vector<Command>& out) {
  struct Side {
    std::string model, adapter, dtype, attention, device;
  };
  struct Args {
    Side a, b;
    std::string dtype = "bf16", attention = "eager", device = "cpu", ids, text, tokenizer,
                gpu_memory;
    int64_t generate = 0;
    bool json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand(
      "compare",
      "Run A and B on the same input and report how far apart they are, layer by layer "
      "(merged vs base + adapter, fp16 vs fp32, eager vs fused, base vs fine-tune)");
  app->add_option("A", a->a.model, "Checkpoint directory or hub id")
      ->type_name("MODEL")
      ->required();
  app->add_option("B", a->b.model, "Checkpoint directory or hub id (may be A itself)")
      ->type_name("MODEL")
      ->required();
  app->add_option("--adapter-a", a->a.adapter, "PEFT adapter applied unmerged to A")
      ->type_name("DIR");
  app->add_option("--adapter-b", a->b.adapter, "PEFT adapter applied unmerged to B")
      ->type_name("DIR");
  app->add_option("--dtype", a->dtype, "Run dtype of both: fp32 | bf16 | fp16 | auto")
      ->type_name("DTYPE")
      ->capture_default_str();
  app->add_option("--dtype-a", a->a.dtype, "Run dtype of A (default: --dtype)")->type_name("DTYPE");
  app->add_option("--dtype-b", a->b.dtype, "Run dtype of B (default: --dtype)")->type_name("DTYPE");
  add_attention_option(app, a->attention);
  app->add_option("--attention-a", a->a.attention, "Attention of A (default: --attention)")
      ->type_name("PROFILE");
  app->add_option("--attention-b", a->b.attention, "Attention of B (default: --attention)")
      ->type_name("PROFILE");
  app->add_option("--device", a->device, "Where both run: cpu | cuda (an NVIDIA GPU)")
      ->type_name("DEVICE")
      ->capture_default_str();
  app->add_option("--device-a", a->a.device, "Where A runs (default: --device)")
      ->type_name("DEVICE");
  app->add_option("--device-b", a->b.device, "Where B runs (default: --device)")
      ->type_name("DEVICE");
  add_token_options(app, a->ids, a->text, a->tokenizer, "Text, tokenized with A's tokenizer.json");
  app->add_option("--generate", a->generate,
                  "Also decode N tokens greedily with each, side by side")
      ->type_name("N");
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_gpu_memory_option(app, a->gpu_memory);
  add_threads_option(app, a->threads, " of the forward passes");
  describe(app,
           "  nanscope compare ./merged Qwen/Qwen3-4B --adapter-b ./my-lora --text \"Hello\"\n"
           "  nanscope compare ./model ./model --dtype-a fp16 --dtype-b fp32 --text \"Hi\" --json\n"
           "  nanscope compare ./fine-tune Qwen/Qwen3-4B --text \"Hi\" --generate 32\n"
           "  nanscope compare ./model ./model --device-a cpu --device-b cuda --text \"Hi\"\n",
           "0 both runs finite, 1 a state or the logits of A or B hold NaN/inf");
  out.push_back(
      {app, [a] {
         apply_threads(a->threads);
         const std::string pa = model_path(a->a.model), pb = model_path(a->b.model);
         Checkpoint ca = Checkpoint::open(pa);
         Checkpoint cb = Checkpoint::open(pb);
         auto side = [&](const Side& s, const Checkpoint& ck, const std::string& dir,
                         const char* which) {
           CompareSide cs;
           cs.ck = &ck;
           const std::string d = s.dtype.empty() ? a->dtype : s.dtype;
           const std::string at = s.attention.empty() ? a->attention : s.attention;
           const DType dt = parse_run_dtype_flag(fmt::format("--dtype-{}", which), d, dir);
           const AttentionProfile ap = parse_attention_flag(at);
           cs.dtype = dt;
           cs.attention = ap;
           cs.device = parse_device_flag(s.device.empty() ? a->device : s.device);
           if (!s.adapter.empty()) cs.adapter = AdapterOverlay::open(model_path(s.adapter), ck);
           cs.label = fmt::format(
               "{}{} {} {}{}", s.model, s.adapter.empty() ? "" : " + " + s.adapter + " (unmerged)",
               run_dtype_name(dt), attention_name(ap), cs.device == Device::Cuda ? " cuda" : "");
           return cs;
         };
         const CompareSide sa = side(a->a, ca, pa, "a"), sb = side(a->b, cb, pb, "b");
         apply_gpu_memory(a->gpu_memory, sa.device == Device::Cuda || sb.device == Device::Cuda);
         if (a->generate < 0) fail_usage("--generate {} is negative", a->generate);
         const auto ids = resolve_tokens(pa, a->ids, a->text, a->tokenizer);
         const CompareResult r = compare(sa, sb, ids, a->generate);
         print_out(a->json ? compare_json(r).dump(2) : compare_text(r));
         return r.finite_a && r.finite_b ? kClean : kProblem;
       }});
}

}  // namespace nanscope::cli
