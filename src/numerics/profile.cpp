#include "numerics/profile.hpp"

#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <string_view>

namespace nanscope::profile {

namespace {
std::mutex mu;
std::map<std::string, double>& sums() {
  static std::map<std::string, double> m;
  return m;
}
}  // namespace

bool enabled() {
  static const bool on = [] {
    const char* e = std::getenv("NANSCOPE_PROFILE");
    return e != nullptr && *e != '\0' && std::string_view(e) != "0";
  }();
  return on;
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
