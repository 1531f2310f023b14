// A tiny fork-join parallel_for over an index range, for the forward pass's kernels. Each call
// splits [0, n) into contiguous chunks, one per worker thread, and joins before returning, so
// a kernel's result never depends on the number of threads (each output is computed by exactly
// one thread, in the same order).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace nanscope {

// Worker count: hardware_concurrency (at least 1), or NANSCOPE_THREADS from the environment.
int default_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n); chunks are multiples of `grain`
// (except the last). Runs inline when one chunk suffices. Rethrows the first exception.
template <typename Fn>
void parallel_for(int64_t n, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int64_t workers = std::min<int64_t>(default_threads(), max_chunks);
  if (workers <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  // Chunk size rounded up to the grain so that SIMD blocks stay whole.
  int64_t chunk = (n + workers - 1) / workers;
  chunk = (chunk + grain - 1) / grain * grain;
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(workers));
  threads.reserve(size_t(workers));
  for (int64_t w = 1; w < workers; ++w) {
    const int64_t b = w * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    threads.emplace_back([&, w, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        errors[size_t(w)] = std::current_exception();
      }
    });
  }
  try {
    fn(int64_t{0}, std::min(n, chunk));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace nanscope
