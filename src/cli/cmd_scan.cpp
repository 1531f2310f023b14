#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "tools/scan.hpp"

namespace nanscope::cli {

void add_scan(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string model, adapter;
    bool json = false;
    int threads = 0;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand("scan",
                                  "Static check: structure against config.json and the "
                                  "value of every tensor (NaN, inf, fp16 range)");
  add_model_arg(app, a->model);
  app->add_option("--adapter", a->adapter, "PEFT adapter directory (or hub id) to scan too")
      ->type_name("DIR");
  app->add_flag("--json", a->json, "Print one JSON document on stdout");
  add_threads_option(app, a->threads, "");
  describe(app,
           "  nanscope scan ./merged\n"
           "  nanscope scan Qwen/Qwen3-4B --adapter ./my-lora --json | jq .findings\n",
           "0 no finding of severity error, 1 an error finding (NaN/inf, missing or misshapen "
           "tensors)");
  out.push_back({app, [a] {
                   ScanOptions opt;
                   const std::string model = model_path(a->model);
                   if (!a->adapter.empty()) opt.adapter = model_path(a->adapter);
                   opt.threads = apply_threads(a->threads);
                   ScanResult r = scan(model, opt);
                   print_out(a->json ? scan_to_json(r).dump(2) : scan_to_text(r));
                   return r.has_error() ? kProblem : kClean;
                 }});
}

}  // namespace nanscope::cli
