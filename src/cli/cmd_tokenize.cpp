#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "cli/inputs.hpp"
#include "tokenizer/bpe.hpp"

namespace nanscope::cli {

void add_tokenize(CLI::App& root, std::vector<Command>& out) {
  struct Args {
    std::string source, text;
    bool json = false;
  };
  auto a = std::make_shared<Args>();
  auto* app = root.add_subcommand("tokenize",
                                  "Print the token ids of a text (Hugging Face "
                                  "tokenizers' ids, without special tokens added)");
  app->add_option("SOURCE", a->source,
                  "Checkpoint directory (or hub id) holding tokenizer.json, or the file itself")
      ->type_name("PATH")
      ->required();
  app->add_option("--text", a->text, "The text")->type_name("STR")->required();
  app->add_flag("--json", a->json, "Print {\"ids\": [...]} on stdout");
  describe(app,
           "  nanscope tokenize Qwen/Qwen3-4B --text \"Hello, world!\"\n"
           "  nanscope tokenize ./tokenizer.json --text \"Hello\" --json\n",
           "0 the ids were printed");
  out.push_back({app, [a] {
                   Tokenizer tk = Tokenizer::load(model_path(a->source));
                   auto ids = tk.encode(a->text);
                   if (a->json) {
                     print_out(nlohmann::json{{"ids", ids}}.dump());
                   } else {
                     std::string s;
                     for (size_t i = 0; i < ids.size(); ++i)
                       s += (i ? ", " : "") + std::to_string(ids[i]);
                     print_out("[" + s + "]");
                   }
                   return kClean;
                 }});
}

}  // namespace nanscope::cli
