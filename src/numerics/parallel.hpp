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
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <vector>

namespace nanscope {

// Worker count: backend().threads (NANSCOPE_THREADS, --threads: numerics/backend.hpp), or
// hardware_concurrency (at least 1) where that is 0.
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
  // Always the whole team, the threads past `workers` idle: after a region of fewer threads
  // libgomp regrows its team at the next one, which made every product that followed a small
  // loop slow (a decode step's down_proj after the activation: BENCHMARKS.md, session 12).
#pragma omp parallel num_threads(default_threads())
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

// Items [0, n) processed one at a time: fn(worker, item). Each worker starts on its own
// contiguous share (neighbouring items share data: a worker's blocks of one weight panel) and,
// when that is done, takes items one by one from the far end of the share with the most left.
// For kernels whose items are large (a block of a matrix product: 50-200 us): on a machine whose
// cores run at different speeds (a virtual machine sharing its cores), a static split makes all
// wait for the slowest. Each item is processed whole by one worker, so results do not depend on
// who took it. fn must not throw.
template <typename Fn>
void parallel_for_stealing(int64_t n, Fn&& fn) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(default_threads(), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(int64_t{0}, i);
    return;
  }
  // Worker w's remaining share [lo, hi) packed in one 64-bit word: lo << 32 | hi.
  struct alignas(64) Share {
    std::atomic<uint64_t> range;
  };
  std::vector<Share> shares(static_cast<size_t>(workers));
  for (int64_t w = 0; w < workers; ++w) {
    const uint64_t lo = uint64_t(n * w / workers), hi = uint64_t(n * (w + 1) / workers);
    shares[size_t(w)].range.store(lo << 32 | hi, std::memory_order_relaxed);
  }
  auto take_front = [&](int64_t w) -> int64_t {
    std::atomic<uint64_t>& r = shares[size_t(w)].range;
    uint64_t cur = r.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = cur >> 32, hi = cur & 0xffffffffu;
      if (lo >= hi) return -1;
      if (r.compare_exchange_weak(cur, (lo + 1) << 32 | hi, std::memory_order_relaxed))
        return int64_t(lo);
    }
  };
  auto steal_back = [&](int64_t thief) -> int64_t {
    for (;;) {
      int64_t victim = -1;
      uint64_t most = 0;
      for (int64_t w = 0; w < workers; ++w) {
        if (w == thief) continue;
        const uint64_t cur = shares[size_t(w)].range.load(std::memory_order_relaxed);
        const uint64_t lo = cur >> 32, hi = cur & 0xffffffffu;
        if (hi > lo && hi - lo > most) most = hi - lo, victim = w;
      }
      if (victim < 0) return -1;
      std::atomic<uint64_t>& r = shares[size_t(victim)].range;
      uint64_t cur = r.load(std::memory_order_relaxed);
      const uint64_t lo = cur >> 32, hi = cur & 0xffffffffu;
      if (lo < hi && r.compare_exchange_strong(cur, lo << 32 | (hi - 1), std::memory_order_relaxed))
        return int64_t(hi - 1);
    }
  };
  parallel_for(workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t i; (i = take_front(w)) >= 0;) fn(w, i);
      for (int64_t i; (i = steal_back(w)) >= 0;) fn(w, i);
    }
  });
}

// Workers that SLEEP between calls, for a loop of many short parallel steps whose calling thread
// does other work in between: the merge's blocks, each followed by the writer's I/O. OpenMP's
// workers spin-wait there (libgomp's default policy) and take the cores from the caller and the
// writer's I/O thread: a 1.2 GB merge on 2 cores used 3.6-4.2 s of CPU instead of 0.3-0.45 s,
// and 8-13 s instead of 1.5-6 s wall under load. Started once, joined at destruction.
class BlockingPool {
 public:
  explicit BlockingPool(int threads);  // threads >= 1, the caller included
  ~BlockingPool();
  BlockingPool(const BlockingPool&) = delete;
  BlockingPool& operator=(const BlockingPool&) = delete;
  int size() const;

  // fn(begin, end, piece) on min(size(), n / 4) (at least 1) contiguous pieces of [0, n), piece p
  // on worker p (the caller is piece 0); the split depends on n and size() only, so per-piece
  // state gives the same results on every run. Rethrows the first piece's exception.
  template <typename Fn>
  void parallel_pieces(int64_t n, Fn&& fn) {
    const int pieces = int(std::min<int64_t>(n_, std::max<int64_t>(1, n / 4)));
    if (pieces <= 1) {
      fn(int64_t{0}, n, 0);
      return;
    }
    const int64_t chunk = (n + pieces - 1) / pieces;
    run(pieces, [&](int w) {
      const int64_t b = w * chunk, e = std::min(n, b + chunk);
      if (b < e) fn(b, e, w);
    });
  }

 private:
  void run(int pieces, const std::function<void(int)>& job);
  struct Workers;  // threads, mutex and condition variables, in parallel.cpp
  std::unique_ptr<Workers> w_;
  int n_;
};

}  // namespace nanscope
