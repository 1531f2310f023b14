// Errors as values that carry their context. Library code throws; the CLI catches once and turns
// the message into exit code 2. Asserts are only for internal invariants, never for bad files.
#pragma once

#include <fmt/format.h>

#include <filesystem>
#include <stdexcept>
#include <string>

namespace nanscope {

// Unusable input: a file that is not what it claims, a config the tool cannot run, bad usage.
// The message names the file (and tensor) and what is wrong, and where it helps, a likely cause.
// kind() and file() are what `--json` reports of a failure (docs/interface.md): kind "usage" (a
// flag or argument), "not_found" (a path or hub id that is not there), or empty for any other bad
// input; file() the file or directory at fault when the thrower knows it (else the CLI reads it
// off the message's "PATH: ..." prefix).
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  InputError(const std::string& message, std::string kind, std::string file)
      : std::runtime_error(message), kind_(std::move(kind)), file_(std::move(file)) {}
  const std::string& kind() const { return kind_; }
  const std::string& file() const { return file_; }

 private:
  std::string kind_, file_;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw InputError(fmt::format(f, std::forward<Args>(args)...));
}

// A bad flag or argument value (kind "usage").
template <typename... Args>
[[noreturn]] void fail_usage(fmt::format_string<Args...> f, Args&&... args) {
  throw InputError(fmt::format(f, std::forward<Args>(args)...), "usage", "");
}

// A path that does not exist, or a hub id not in the local cache (kind "not_found").
template <typename... Args>
[[noreturn]] void fail_not_found(const std::filesystem::path& file, fmt::format_string<Args...> f,
                                 Args&&... args) {
  throw InputError(fmt::format(f, std::forward<Args>(args)...), "not_found", file.string());
}

// An output could not be written (full disk, permissions). Also exit 2; the message names the path.
class OutputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace nanscope
