// NANSCOPE_PROFILE=1 in the environment (backend().profile, numerics/backend.hpp): wall time per
// kind of step (linear, attention, ...), summed over one forward pass and printed on stderr at
// its end. For tuning on a machine without a profiler; no effect on results, and a few clock
// reads per step when off.
#pragma once

#include <chrono>

namespace nanscope::profile {

bool enabled();                              // backend().profile
void add(const char* step, double seconds);  // thread-safe
void print_and_reset(const char* what);      // one line on stderr, then zero the sums

// Times its own lifetime into `step` when profiling is on.
class Scope {
 public:
  explicit Scope(const char* step) : step_(enabled() ? step : nullptr) {
    if (step_) t0_ = std::chrono::steady_clock::now();
  }
  ~Scope() {
    if (step_)
      add(step_, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count());
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  const char* step_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace nanscope::profile
