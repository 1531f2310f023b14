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
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw InputError(fmt::format(f, std::forward<Args>(args)...));
}

// An output could not be written (full disk, permissions). Also exit 2; the message names the path.
class OutputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace nanscope
