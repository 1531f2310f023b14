#include "numerics/parallel.hpp"

#include <cstdlib>
#include <string>
#include <thread>

namespace nanscope {

int default_threads() {
  static const int n = [] {
    if (const char* env = std::getenv("NANSCOPE_THREADS")) {
      try {
        int v = std::stoi(env);
        if (v > 0) return v;
      } catch (...) {
      }
    }
    return std::max(1, int(std::thread::hardware_concurrency()));
  }();
  return n;
}

}  // namespace nanscope
