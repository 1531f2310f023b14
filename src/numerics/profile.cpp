#include "numerics/profile.hpp"

#include <fmt/format.h>

#include <cstdio>
#include <map>
#include <mutex>
#include <string>

#include "numerics/backend.hpp"

namespace nanscope::profile {

namespace {
std::mutex mu;
std::map<std::string, double>& sums() {
  static std::map<std::string, double> m;
  return m;
}
}  // namespace

bool enabled() {
  return backend().profile;
}

void add(const char* step, double seconds) {
  std::lock_guard<std::mutex> g(mu);
  sums()[step] += seconds;
}

void print_and_reset(const char* what) {
  if (!enabled()) return;
  std::lock_guard<std::mutex> g(mu);
  std::string line = fmt::format("nanscope profile ({}):", what);
  for (const auto& [k, v] : sums()) line += fmt::format(" {} {:.3f}s", k, v);
  std::fprintf(stderr, "%s\n", line.c_str());
  sums().clear();
}

}  // namespace nanscope::profile
