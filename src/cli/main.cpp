#include <fmt/format.h>

#include <cstdio>
#include <iostream>
#include <new>

#include "cli/commands.hpp"
#include "common/error.hpp"
#include "common/mapped_files.hpp"
#include "common/temp_files.hpp"
#include "numerics/backend.hpp"
#include "numerics/parallel.hpp"

namespace nanscope::cli {
void print_out(const std::string& s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  if (!s.empty() && s.back() != '\n') std::fputc('\n', stdout);
  std::fflush(stdout);
}

void add_threads_option(CLI::App* app, int& threads, const std::string& what) {
  app->add_option("--threads", threads,
                  "Worker threads" + what + " (default: NANSCOPE_THREADS, else all cores)")
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
}  // namespace nanscope::cli

int main(int argc, char** argv) {
  using namespace nanscope::cli;
  CLI::App app{"nanscope: find where and why a (LoRA-merged) checkpoint produces NaN/inf",
               "nanscope"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("nanscope 0.1.0"));
  std::vector<Command> commands;
  add_scan(app, commands);
  add_trace(app, commands);
  add_tokenize(app, commands);
  add_merge(app, commands);
  add_check(app, commands);
  add_hidden(app, commands);
  add_generate(app, commands);
  add_compare(app, commands);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);  // --help, --version
  } catch (const CLI::ParseError& e) {
    app.exit(e);  // prints the message and usage to stderr
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
    fmt::print(stderr, "nanscope: error: {}\n", e.what());
    return kBadInput;
  } catch (const nanscope::OutputError& e) {
    unless_interrupted();
    fmt::print(stderr, "nanscope: cannot write output: {}\n", e.what());
    return kBadInput;
  } catch (const std::bad_alloc&) {
    fmt::print(stderr, "nanscope: out of memory\n");
    return kBadInput;
  } catch (const std::exception& e) {
    unless_interrupted();
    fmt::print(stderr, "nanscope: internal error: {} (please report this)\n", e.what());
    return kBadInput;
  }
  return kBadInput;
}
