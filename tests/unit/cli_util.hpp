// Runs the real nanscope binary (built next to the tests) and captures exit code and output, so
// the command-line contract (exit codes, --json documents, files written) is tested as users
// and scripts meet it.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace nanscope::testing {

struct CliResult {
  int exit_code = -1;
  std::string out, err;
  nlohmann::json json() const { return nlohmann::json::parse(out); }
};

inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// env: "NAME=VALUE" settings for this run (through env(1)); "-u NAME" entries unset one.
inline CliResult run_cli(const std::vector<std::string>& args,
                         const std::vector<std::string>& env = {}) {
  static int counter = 0;
  const auto dir = std::filesystem::temp_directory_path();
  const auto err_path =
      dir / ("nanscope_cli_err_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
  std::string cmd;
  if (!env.empty()) {
    cmd = "env";
    for (const auto& e : env)
      cmd += e.starts_with("-u ") ? " -u " + shell_quote(e.substr(3)) : " " + shell_quote(e);
    cmd += " ";
  }
  cmd += shell_quote(NANSCOPE_BINARY);
  for (const auto& a : args) cmd += " " + shell_quote(a);
  cmd += " 2>";
  cmd += shell_quote(err_path.string());
  cmd += " </dev/null";
  CliResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 65536> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream e(err_path);
  std::stringstream ss;
  ss << e.rdbuf();
  r.err = ss.str();
  std::filesystem::remove(err_path);
  return r;
}

inline std::string fixture(const std::string& rel) {
  return std::string(NANSCOPE_FIXTURES) + "/" + rel;
}

// A fresh empty directory under the system temp dir, removed when the object goes.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static int n = 0;
    path = std::filesystem::temp_directory_path() /
           ("nanscope_test_" + std::to_string(getpid()) + "_" + std::to_string(n++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

}  // namespace nanscope::testing
