// The fork-join helpers of numerics/parallel.hpp: every item once, whatever the worker count.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "numerics/backend.hpp"
#include "numerics/parallel.hpp"

namespace nanscope {
namespace {

TEST(Parallel, ForCoversEveryIndexOnce) {
  for (int64_t n : {1, 7, 64, 1000}) {
    std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
    parallel_for(n, 8, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) seen[size_t(i)].fetch_add(1);
    });
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[size_t(i)].load(), 1) << "n " << n << " i " << i;
  }
}

// A loop of fewer chunks than workers still runs on the whole pool (the others idle): a team of
// another size between two products made the next one slow to start (docs/forward.md).
TEST(Parallel, FewChunksStillRunOnTheWholePool) {
  Backend b = backend();
  b.threads = 4;
  const ScopedBackend four(b);
  std::vector<std::atomic<int>> seen(3);
  std::atomic<int> team{0};
  parallel_for(3, 1, [&](int64_t lo, int64_t hi) {
    team.store(omp_get_num_threads());
    for (int64_t i = lo; i < hi; ++i) seen[size_t(i)].fetch_add(1);
  });
  EXPECT_EQ(team.load(), 4);
  for (const auto& s : seen) EXPECT_EQ(s.load(), 1);
}

TEST(Parallel, StealingProcessesEveryItemOnceAndMovesSlowItems) {
  for (int64_t n : {1, 2, 5, 33, 1024}) {
    std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
    std::atomic<int64_t> bad_worker{0}, taken_over{0};
    const int64_t workers = std::min<int64_t>(default_threads(), n);
    parallel_for_stealing(n, [&](int64_t w, int64_t i) {
      if (w < 0 || w >= workers) bad_worker.fetch_add(1);
      // Items of the first share are slow: the other workers must take them over.
      if (i < n / std::max<int64_t>(workers, 1)) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        if (w != 0) taken_over.fetch_add(1);
      }
      seen[size_t(i)].fetch_add(1);
    });
    EXPECT_EQ(bad_worker.load(), 0);
    // 1024 items: the first worker's share sleeps for about 0.1 s / workers; others take some.
    if (n == 1024 && workers > 1) {
      EXPECT_GT(taken_over.load(), 0);
    }
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[size_t(i)].load(), 1) << "n " << n << " i " << i;
  }
}

TEST(Parallel, StealingNestedInsideParallelForRunsInline) {
  std::atomic<int64_t> total{0};
  parallel_for(4, 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j)
      parallel_for_stealing(50, [&](int64_t, int64_t i) { total.fetch_add(i + 1); });
  });
  EXPECT_EQ(total.load(), 4 * 50 * 51 / 2);
}

}  // namespace
}  // namespace nanscope
