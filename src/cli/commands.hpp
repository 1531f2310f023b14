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
void add_generate(CLI::App& root, std::vector<Command>& out);
void add_compare(CLI::App& root, std::vector<Command>& out);

// Writes a JSON document or human text to stdout.
void print_out(const std::string& s);

// The version of the build (CMake's project version).
const char* version();

// MODEL: a checkpoint directory or hub id (cli/inputs.hpp model_path resolves it), required.
void add_model_arg(CLI::App* app, std::string& model);
// --ids LIST, --text STR, --tokenizer FILE (trace, check); `text_help` describes --text.
void add_token_options(CLI::App* app, std::string& ids, std::string& text, std::string& tokenizer,
                       const std::string& text_help);
// --attention PROFILE with its default shown; `extra` adds to the help ("| both ...").
void add_attention_option(CLI::App* app, std::string& attention, const std::string& extra = "");

// The end of a subcommand's --help: examples (one command a line, indented) and what its exit
// codes 0 and 1 mean (2 and the hub ids are said the same way for every command).
void describe(CLI::App* app, const std::string& examples, const std::string& exit_codes);

// --threads N on a subcommand: the worker count of its parallel steps (scan, merge, the forward
// pass), kept in the kernels' options (numerics/backend.hpp, which also reads NANSCOPE_THREADS).
void add_threads_option(CLI::App* app, int& threads, const std::string& what);
// Puts a --threads value (0: not given) into the kernels' options and returns the worker count
// in force: N, else NANSCOPE_THREADS, else one per hardware thread.
int apply_threads(int threads);

// --gpu-memory SIZE on a subcommand with --device: the GPU memory the weights may hold
// (Backend::cuda_weight_cap, also NANSCOPE_GPU_MEMORY); the layers beyond are streamed from
// host memory (src/cuda/weight_plan.hpp).
void add_gpu_memory_option(CLI::App* app, std::string& size);
// Puts a --gpu-memory value (empty: not given) into the kernels' options. A size that does not
// parse, or one given without --device cuda on any side (`cuda_used`), is a usage error.
void apply_gpu_memory(const std::string& size, bool cuda_used);

}  // namespace nanscope::cli
