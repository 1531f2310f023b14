#include "common/interrupt_check.hpp"

#include <chrono>

namespace nanscope {

namespace {
thread_local InterruptCheck current = nullptr;
thread_local std::chrono::steady_clock::time_point last{};
}  // namespace

ScopedInterruptCheck::ScopedInterruptCheck(InterruptCheck check) : saved_(current) {
  current = check;
  last = {};
}

ScopedInterruptCheck::~ScopedInterruptCheck() {
  current = saved_;
}

void check_interrupt() {
  if (!current) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - last < std::chrono::milliseconds(20)) return;
  last = now;
  current();
}

}  // namespace nanscope
