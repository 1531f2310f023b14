// A fork-join parallel_for over an index range, for the forward pass's kernels. Each call
// splits [0, n) into contiguous chunks, one per worker, and joins before returning, so a
// kernel's result never depends on the number of threads (each output is computed by exactly
// one thread, in the same order).
//
// The workers are OpenMP's (libgomp), the same pool oneDNN's matrix products run on. With
// threads of our own, oneDNN's busy-waiting workers shared the cores with them after every
// product: the rounding pass after the bf16 products took 1.03 s instead of 0.30 s (16-core
// Xeon, 1024 tokens of a 4B model). A pool also saves creating threads per call.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <vector>

namespace nanscope {

// Worker count: hardware_concurrency (at least 1), or NANSCOPE_THREADS from the environment.
int default_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n); chunks are multiples of `grain`
// (except the last). Runs inline when one chunk suffices. Rethrows the first exception.
// Inside another parallel region (nested), the chunks run one after another in this thread.
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
  std::vector<std::exception_ptr> errors(static_cast<size_t>(workers));
#pragma omp parallel num_threads(int(workers))
  {
    // The team may be smaller than asked (nested regions): chunks are dealt round-robin.
    const int64_t team = omp_get_num_threads();
    for (int64_t c = omp_get_thread_num(); c < workers; c += team) {
      const int64_t b = c * chunk, e = std::min(n, b + chunk);
      if (b >= e) continue;
      try {
        fn(b, e);
      } catch (...) {
        errors[size_t(c)] = std::current_exception();
      }
    }
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace nanscope
