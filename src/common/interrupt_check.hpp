// Safe points where a long run can be stopped by the program that embeds nanscope: between the
// decoder layers of every forward pass (trace, check, hidden, generate, compare), between merged
// tensors and between scanned tensors. The Python module installs a check there that runs
// Python's signal handlers (PyErr_CheckSignals), because Python only sees Ctrl-C once a call
// returns and a call into nanscope can last minutes. The command line needs none of this: its
// signal handler ends the process itself (common/temp_files.hpp).
#pragma once

namespace nanscope {

// Throws to stop the run; whatever it throws reaches the caller unchanged.
using InterruptCheck = void (*)();

// Installs `check` for this thread for its lifetime (the previous one is restored after).
class ScopedInterruptCheck {
 public:
  explicit ScopedInterruptCheck(InterruptCheck check);
  ~ScopedInterruptCheck();
  ScopedInterruptCheck(const ScopedInterruptCheck&) = delete;
  ScopedInterruptCheck& operator=(const ScopedInterruptCheck&) = delete;

 private:
  InterruptCheck saved_;
};

// At a safe point: calls this thread's check, if any, at most every 20 ms (the check may take a
// lock such as Python's GIL). Other threads (the kernels' workers) have none.
void check_interrupt();

}  // namespace nanscope
