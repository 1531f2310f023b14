#include "numerics/parallel.hpp"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "numerics/backend.hpp"

namespace nanscope {

int default_threads() {
  static const int hardware = std::max(1, int(std::thread::hardware_concurrency()));
  const int n = backend().threads;
  return n > 0 ? n : hardware;
}

struct BlockingPool::Workers {
  std::vector<std::thread> threads;
  std::mutex mu;
  std::condition_variable cv, done_cv;
  uint64_t gen = 0;
  bool stop = false;
  int active = 0, remaining = 0;
  const std::function<void(int)>* job = nullptr;
  std::vector<std::exception_ptr> errors;

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* j = nullptr;
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return gen != seen; });
        seen = gen;
        if (stop) return;
        if (id >= active) continue;
        j = job;
      }
      (*j)(id);
      {
        std::lock_guard<std::mutex> lk(mu);
        --remaining;
      }
      done_cv.notify_one();
    }
  }
};

BlockingPool::BlockingPool(int threads)
    : w_(std::make_unique<Workers>()), n_(std::max(1, threads)) {
  for (int i = 1; i < n_; ++i) w_->threads.emplace_back([this, i] { w_->loop(i); });
}

BlockingPool::~BlockingPool() {
  {
    std::lock_guard<std::mutex> lk(w_->mu);
    w_->stop = true;
    ++w_->gen;
  }
  w_->cv.notify_all();
  for (auto& th : w_->threads) th.join();
}

int BlockingPool::size() const {
  return n_;
}

void BlockingPool::run(int pieces, const std::function<void(int)>& job) {
  Workers& w = *w_;
  w.errors.assign(size_t(pieces), nullptr);
  const std::function<void(int)> guarded = [&](int i) {
    try {
      job(i);
    } catch (...) {
      w.errors[size_t(i)] = std::current_exception();
    }
  };
  {
    std::lock_guard<std::mutex> lk(w.mu);
    w.job = &guarded;
    w.active = pieces;
    w.remaining = pieces - 1;
    ++w.gen;
  }
  w.cv.notify_all();
  guarded(0);
  {
    std::unique_lock<std::mutex> lk(w.mu);
    w.done_cv.wait(lk, [&] { return w.remaining == 0; });
    w.job = nullptr;
  }
  for (auto& e : w.errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace nanscope
