// Each subcommand lives in its own file and registers its flags on the root app; main() parses,
// runs the chosen one, and is the one place where errors become messages and exit codes.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace nanscope::cli {

enum Exit : int { kClean = 0, kProblem = 1, kBadInput = 2 };

struct Command {
  CLI::App* app;
  std::function<int()> run;
};

void add_scan(CLI::App& root, std::vector<Command>& out);
void add_trace(CLI::App& root, std::vector<Command>& out);
void add_tokenize(CLI::App& root, std::vector<Command>& out);
void add_merge(CLI::App& root, std::vector<Command>& out);
void add_check(CLI::App& root, std::vector<Command>& out);
void add_hidden(CLI::App& root, std::vector<Command>& out);

// Writes a JSON document or human text to stdout.
void print_out(const std::string& s);

// The version of the build (CMake's project version).
const char* version();

// The end of a subcommand's --help: examples (one command a line, indented) and what its exit
// codes 0 and 1 mean (2 and the hub ids are said the same way for every command).
void describe(CLI::App* app, const std::string& examples, const std::string& exit_codes);

// --threads N on a subcommand: the worker count of its parallel steps (scan, merge, the forward
// pass), kept in the kernels' options (numerics/backend.hpp, which also reads NANSCOPE_THREADS).
void add_threads_option(CLI::App* app, int& threads, const std::string& what);
// Puts a --threads value (0: not given) into the kernels' options and returns the worker count
// in force: N, else NANSCOPE_THREADS, else one per hardware thread.
int apply_threads(int threads);

}  // namespace nanscope::cli
