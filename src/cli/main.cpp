#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <new>

#include "cli/commands.hpp"
#include "common/error.hpp"
#include "common/mapped_files.hpp"
#include "common/strings.hpp"
#include "common/temp_files.hpp"
#include "numerics/backend.hpp"
#include "numerics/parallel.hpp"

#ifndef NANSCOPE_VERSION
#define NANSCOPE_VERSION "unknown"
#endif

namespace nanscope::cli {

const char* version() {
  return NANSCOPE_VERSION;
}

void print_out(const std::string& s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  if (!s.empty() && s.back() != '\n') std::fputc('\n', stdout);
  std::fflush(stdout);
}

void add_threads_option(CLI::App* app, int& threads, const std::string& what) {
  app->add_option("--threads", threads,
                  "Worker threads" + what + " (default: NANSCOPE_THREADS, else all cores)")
      ->type_name("N")
      ->check(CLI::Range(0, 1 << 16));
}

int apply_threads(int threads) {
  if (threads > 0) {
    nanscope::Backend b = nanscope::backend();
    b.threads = threads;
    nanscope::set_backend(b);
  }
  return nanscope::default_threads();
}

void add_gpu_memory_option(CLI::App* app, std::string& size) {
  app->add_option("--gpu-memory", size,
                  "With --device cuda: GPU memory the weights may hold (4GiB, 500MB); the layers "
                  "that do not fit are streamed from host memory, two at a time (default: "
                  "NANSCOPE_GPU_MEMORY, else every weight on the GPU)")
      ->type_name("SIZE");
}

void apply_gpu_memory(const std::string& size, bool cuda_used) {
  if (size.empty()) return;
  const std::optional<uint64_t> v = nanscope::parse_byte_size(size);
  if (!v) fail_usage("--gpu-memory {}: expected a size like 4GiB or 500MB", size);
  if (!cuda_used) fail_usage("--gpu-memory {}: it caps the GPU's memory; add --device cuda", size);
  nanscope::Backend b = nanscope::backend();
  b.cuda_weight_cap = *v;
  nanscope::set_backend(b);
}

void add_model_arg(CLI::App* app, std::string& model) {
  app->add_option("MODEL", model, "Hugging Face checkpoint directory or hub id")
      ->type_name("DIR")
      ->required();
}

void add_token_options(CLI::App* app, std::string& ids, std::string& text, std::string& tokenizer,
                       const std::string& text_help) {
  app->add_option("--ids", ids, "Token ids, comma-separated")->type_name("LIST");
  app->add_option("--text", text, text_help)->type_name("STR");
  app->add_option("--tokenizer", tokenizer, "tokenizer.json to use for --text")->type_name("FILE");
}

void add_attention_option(CLI::App* app, std::string& attention, const std::string& extra) {
  app->add_option("--attention", attention,
                  "eager (transformers' eager attention) | fused, also spelled sdpa (scores and "
                  "softmax in fp32, as SDPA / flash / SGLang)" +
                      extra)
      ->type_name("PROFILE")
      ->capture_default_str();
}

void describe(CLI::App* app, const std::string& examples, const std::string& exit_codes) {
  app->footer(
      fmt::format("\nExamples:\n{}\nExit codes: {}; 2 unusable input or usage (the "
                  "message names the file; with --json also one JSON document {{\"error\": "
                  "{{...}}}} on stdout).\nMODEL, --base and --adapter take a directory or "
                  "a Hugging Face hub id (Org/Name[@revision]) from the local cache.",
                  examples, exit_codes));
}

namespace {

// Optimal string alignment distance (Levenshtein plus adjacent transpositions).
size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i)
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[a.size()][b.size()];
}

// The closest of `names` to `word` when it is close enough to be a typo (or a prefix), else "".
std::string did_you_mean(std::string_view word, const std::vector<std::string>& names) {
  std::string best;
  size_t best_d = std::string::npos;
  for (const auto& n : names) {
    const size_t d = n.starts_with(word) && word.size() >= 2 ? 1 : edit_distance(word, n);
    if (d < best_d) best_d = d, best = n;
  }
  const size_t allowed = std::max<size_t>(1, std::min<size_t>(2, word.size() / 3));
  return best_d <= allowed ? best : "";
}

std::string overview(const CLI::App& app) {
  std::string s = fmt::format(
      "nanscope {}: find where and why a (LoRA-merged) checkpoint produces NaN/inf\n\n"
      "Usage: nanscope COMMAND ARGS...   (nanscope COMMAND --help: its flags, defaults and "
      "examples)\n\nCommands:\n",
      version());
  for (const CLI::App* c : app.get_subcommands([](const CLI::App*) { return true; })) {
    std::string d = c->get_description();
    if (const size_t cut = d.find(" ("); cut != std::string::npos && cut > 40) d.resize(cut);
    s += fmt::format("  {:<9} {}\n", c->get_name(), d);
  }
  s += "\nMODEL, --base and --adapter take a directory or a Hugging Face hub id "
       "(Org/Name[@revision]) from the local cache.\nExit codes: 0 clean / PASS, 1 a problem "
       "found, 2 unusable input or usage.\n";
  return s;
}

// The file a message names, for --json: the first "PATH: " part of the message that exists on
// disk or looks like a path ("tokenizer: FILE: ...", "FILE: ..."); "" when there is none.
std::string file_in_message(const std::string& m) {
  size_t b = 0;
  for (int part = 0; part < 2; ++part) {
    const size_t e = m.find(": ", b);
    if (e == std::string::npos) break;
    const std::string cand = m.substr(b, e - b);
    std::error_code ec;
    if (!cand.empty() && (std::filesystem::exists(cand, ec) ||
                          (cand.find('/') != std::string::npos && cand.find(' ') == cand.npos)))
      return cand;
    b = e + 2;
  }
  return "";
}

bool g_json = false;  // --json was asked for: a failure is a JSON document on stdout too

// Prints a failure: "nanscope: PREFIX MESSAGE" on stderr, and with --json the document
// {"error": {"kind", "file", "message"}} on stdout (docs/interface.md).
int report(const std::string& kind, std::string file, const std::string& prefix,
           const std::string& message) {
  fmt::print(stderr, "nanscope: {}{}\n", prefix, message);
  if (g_json) {
    if (file.empty()) file = file_in_message(message);
    nlohmann::json j = {{"error",
                         {{"kind", kind},
                          {"file", file.empty() ? nlohmann::json(nullptr) : nlohmann::json(file)},
                          {"message", message}}}};
    print_out(j.dump(2));
  }
  return kBadInput;
}

std::vector<std::string> subcommand_names(const CLI::App& app) {
  std::vector<std::string> names;
  for (const CLI::App* c : app.get_subcommands([](const CLI::App*) { return true; }))
    names.push_back(c->get_name());
  return names;
}

}  // namespace
}  // namespace nanscope::cli

int main(int argc, char** argv) {
  using namespace nanscope::cli;
  CLI::App app{"nanscope: find where and why a (LoRA-merged) checkpoint produces NaN/inf",
               "nanscope"};
  app.require_subcommand(1);
  const std::string version_line = std::string("nanscope ") + version();
  app.set_version_flag("--version", version_line);
  std::vector<Command> commands;
  add_scan(app, commands);
  add_trace(app, commands);
  add_tokenize(app, commands);
  add_merge(app, commands);
  add_check(app, commands);
  add_hidden(app, commands);
  add_generate(app, commands);
  add_compare(app, commands);
  for (auto& c : commands) c.app->set_version_flag("--version", version_line);
  app.footer(
      "\nExamples:\n"
      "  nanscope check ./merged --base Qwen/Qwen3-4B --adapter ./my-lora\n"
      "  nanscope merge --base Qwen/Qwen3-4B --adapter ./my-lora --out ./merged --dtype fp32\n"
      "\nMODEL, --base and --adapter take a directory or a Hugging Face hub id "
      "(Org/Name[@revision]) from the local cache.\n"
      "Exit codes: 0 clean / PASS, 1 a problem found, 2 unusable input or usage.");

  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--json") == 0) g_json = true;
  nanscope::set_mapping_fault_json(g_json);

  // `nanscope` alone, or a command that is not one: the list of commands (and a guess).
  const std::vector<std::string> names = subcommand_names(app);
  if (argc == 2 && std::strcmp(argv[1], "help") == 0) {
    std::fputs(app.help().c_str(), stdout);
    return kClean;
  }
  if (argc == 1) {
    std::fputs(overview(app).c_str(), stderr);
    if (g_json) report("usage", "", "", "no command given");
    return kBadInput;
  }
  if (argv[1][0] != '-' && std::find(names.begin(), names.end(), argv[1]) == names.end()) {
    const std::string guess = did_you_mean(argv[1], names);
    std::fputs(overview(app).c_str(), stderr);
    std::fputs("\n", stderr);
    return report("usage", "", "",
                  fmt::format("unknown command \"{}\"{}", argv[1],
                              guess.empty() ? "" : fmt::format("; did you mean \"{}\"?", guess)));
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);  // --help, --version
  } catch (const CLI::ParseError& e) {
    std::string message = e.what();
    // An unknown flag of a subcommand: the closest of its flags.
    if (dynamic_cast<const CLI::ExtrasError*>(&e))
      for (auto& c : commands) {
        if (!c.app->parsed()) continue;
        std::vector<std::string> flags;
        for (const CLI::Option* o : c.app->get_options())
          for (const auto& l : o->get_lnames()) flags.push_back("--" + l);
        for (const auto& extra : c.app->remaining()) {
          if (!extra.starts_with("--")) continue;
          const std::string flag = extra.substr(0, extra.find('='));
          const std::string guess = did_you_mean(flag, flags);
          if (!guess.empty()) message += fmt::format("; did you mean {}?", guess);
        }
      }
    fmt::print(stderr, "{}\n", message);
    fmt::print(stderr, "Run with --help for the flags, their defaults and examples.\n");
    if (g_json) {
      nlohmann::json j = {{"error", {{"kind", "usage"}, {"file", nullptr}, {"message", message}}}};
      print_out(j.dump(2));
    }
    return kBadInput;
  }
  // A mapped file truncated under us: a message naming it and exit 2, not SIGBUS. Ctrl-C and
  // kill: every temporary removed at once, what was finished said (common/temp_files.hpp).
  nanscope::install_mapping_fault_handler();
  nanscope::install_interrupt_cleanup();
  nanscope::set_notice_sink([](const std::string& m) { fmt::print(stderr, "nanscope: {}\n", m); });
  // An error caused by the interrupt cleanup removing files under the command's feet is not
  // reported: the cleanup prints what happened and ends the process.
  auto unless_interrupted = [] {
    if (nanscope::interrupt_pending()) nanscope::wait_for_interrupt_cleanup();
  };
  try {
    for (auto& c : commands)
      if (c.app->parsed()) return c.run();
  } catch (const nanscope::InputError& e) {
    unless_interrupted();
    return report(e.kind().empty() ? "input" : e.kind(), e.file(), "error: ", e.what());
  } catch (const nanscope::OutputError& e) {
    unless_interrupted();
    return report("output", "", "cannot write output: ", e.what());
  } catch (const std::bad_alloc&) {
    return report("out_of_memory", "", "", "out of memory");
  } catch (const std::exception& e) {
    unless_interrupted();
    return report("internal", "",
                  "internal error: ", std::string(e.what()) + " (please report this)");
  }
  return kBadInput;
}
