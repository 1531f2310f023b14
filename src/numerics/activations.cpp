#include "numerics/activations.hpp"

#include <cstdlib>
#include <map>
#include <mutex>

namespace nanscope::activation_cache {

namespace {
// Blocks below this go straight to malloc/free (glibc keeps those in its heap anyway).
constexpr size_t kMinCached = size_t(1) << 20;
// Bound on what is kept: a few layers' worth of a large batch.
constexpr size_t kMaxCachedBytes = size_t(8) << 30;

std::mutex mu;
std::multimap<size_t, void*>& blocks() {
  static std::multimap<size_t, void*> m;
  return m;
}
size_t cached_bytes = 0;
}  // namespace

void* acquire(size_t bytes) {
  if (bytes >= kMinCached) {
    std::lock_guard<std::mutex> g(mu);
    auto it = blocks().find(bytes);
    if (it != blocks().end()) {
      void* p = it->second;
      blocks().erase(it);
      cached_bytes -= bytes;
      return p;
    }
  }
  void* p = std::malloc(bytes == 0 ? 1 : bytes);
  if (!p) throw std::bad_alloc();
  return p;
}

void release(void* p, size_t bytes) {
  if (!p) return;
  if (bytes >= kMinCached) {
    std::lock_guard<std::mutex> g(mu);
    if (cached_bytes + bytes <= kMaxCachedBytes) {
      blocks().emplace(bytes, p);
      cached_bytes += bytes;
      return;
    }
  }
  std::free(p);
}

void trim() {
  std::lock_guard<std::mutex> g(mu);
  for (auto& [n, p] : blocks()) std::free(p);
  blocks().clear();
  cached_bytes = 0;
}

}  // namespace nanscope::activation_cache
