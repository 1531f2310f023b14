#include "numerics/parallel.hpp"

#include <thread>

#include "numerics/backend.hpp"

namespace nanscope {

int default_threads() {
  static const int hardware = std::max(1, int(std::thread::hardware_concurrency()));
  const int n = backend().threads;
  return n > 0 ? n : hardware;
}

}  // namespace nanscope
