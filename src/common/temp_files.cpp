#include "common/temp_files.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <thread>

namespace nanscope {

namespace fs = std::filesystem;

namespace {

constexpr std::string_view kTmp = ".tmp-";
// A directory being removed by the interrupt cleanup is first renamed to this (atomic against
// the main thread's rename into place); a leftover of it is stale like the temporary itself.
constexpr std::string_view kRemoving = ".removing";

std::mutex g_mu;  // the registry, the note, the sink; held for good by the interrupt cleanup
std::vector<fs::path> g_registered;
std::string g_note;
std::function<void(const std::string&)> g_sink;
std::atomic<bool> g_pending{false};
int g_pipe[2] = {-1, -1};

// "<base>.tmp-<digits>" (optionally + ".removing"): base and pid, or pid 0 for any other name.
std::pair<std::string_view, long> split_temporary(std::string_view name) {
  if (name.ends_with(kRemoving)) name.remove_suffix(kRemoving.size());
  const size_t at = name.rfind(kTmp);
  if (at == std::string_view::npos || at == 0) return {{}, 0};
  const std::string_view digits = name.substr(at + kTmp.size());
  long pid = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), pid);
  if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size() || pid <= 0)
    return {{}, 0};
  return {name.substr(0, at), pid};
}

bool registered_locked(const fs::path& p) {
  return std::find(g_registered.begin(), g_registered.end(), p) != g_registered.end();
}

// Gone for sure: no process has that PID. EPERM (another user's process) counts as alive.
bool process_gone(long pid) {
  return ::kill(pid_t(pid), 0) == -1 && errno == ESRCH;
}

uint64_t bytes_of(const fs::path& p) {
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(p, ec);
  if (ec) return 0;
  if (fs::is_regular_file(st)) {
    const uintmax_t n = fs::file_size(p, ec);
    return ec ? 0 : uint64_t(n);
  }
  if (!fs::is_directory(st)) return 0;
  uint64_t total = 0;
  for (fs::recursive_directory_iterator it(p, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code e2;
    if (it->is_regular_file(e2) && !it->is_symlink(e2)) {
      const uintmax_t n = it->file_size(e2);
      if (!e2) total += uint64_t(n);
    }
  }
  return total;
}

void write_all(int fd, std::string_view s) {
  while (!s.empty()) {
    const ssize_t n = ::write(fd, s.data(), s.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    s.remove_prefix(size_t(n));
  }
}

void remove_registered_pass(std::vector<std::string>& lines) {
  for (const fs::path& p : g_registered) {
    std::error_code ec;
    const fs::file_status st = fs::symlink_status(p, ec);
    if (ec || !fs::exists(st)) continue;  // renamed into place, or not created (yet)
    const uint64_t bytes = bytes_of(p);
    if (fs::is_directory(st)) {
      fs::path away = p;
      away += kRemoving;
      fs::rename(p, away, ec);
      if (ec) continue;  // renamed into place meanwhile: that output is whole
      fs::remove_all(away, ec);
    } else {
      fs::remove(p, ec);
    }
    lines.push_back(ec ? fmt::format("could not remove temporary {}: {}", p.string(), ec.message())
                       : fmt::format("removed temporary {} ({} bytes)", p.string(), bytes));
  }
}

// With g_mu held. A directory is renamed out of the way first: the main thread may be renaming
// it into place at this moment, and it must then be either whole at the final name or gone.
// A temporary is registered just before it is created: one created while the first pass ran is
// caught by a second pass a moment later (reported in the same list).
std::vector<std::string> remove_registered_locked() {
  std::vector<std::string> lines;
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    remove_registered_pass(lines);
  }
  g_registered.clear();
  if (!g_note.empty()) lines.push_back(g_note);
  return lines;
}

void cleanup_thread() {
  unsigned char sig = 0;
  for (;;) {
    const ssize_t n = ::read(g_pipe[0], &sig, 1);
    if (n == 1) break;
    if (n < 0 && errno == EINTR) continue;
    return;  // the pipe is gone: nothing to do
  }
  g_pending.store(true);
  g_mu.lock();  // never unlocked: registrations after this wait for the end of the process
  std::string out;
  for (const std::string& l : remove_registered_locked())
    out += fmt::format("nanscope: interrupted: {}\n", l);
  if (out.empty()) out = "nanscope: interrupted\n";
  std::fflush(stdout);
  write_all(STDERR_FILENO, out);
  // End by the signal itself, so that a calling shell sees "killed by SIGINT" and stops its loop
  // (status 128 + signal either way).
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(int(sig), &dfl, nullptr);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, int(sig));
  ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  ::raise(int(sig));
  ::_exit(128 + int(sig));
}

extern "C" void on_interrupt_signal(int sig) {
  const int saved = errno;
  const unsigned char b = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t n = ::write(g_pipe[1], &b, 1);
  errno = saved;
}

}  // namespace

fs::path temporary_path(const fs::path& final_path) {
  fs::path p = final_path;
  p += std::string(kTmp) + std::to_string(::getpid());
  return p;
}

std::string describe(const StaleTemporary& t) {
  if (!t.error.empty())
    return fmt::format("could not remove stale temporary {} of a dead process ({})",
                       t.path.string(), t.error);
  return fmt::format("removed stale temporary {} of a dead process ({} bytes)", t.path.string(),
                     t.bytes);
}

std::vector<StaleTemporary> remove_stale_temporaries_in(
    const fs::path& dir, const std::function<bool(std::string_view)>& ours) {
  std::vector<StaleTemporary> out;
  std::error_code ec;
  const fs::path d = dir.empty() ? fs::path(".") : dir;
  std::vector<std::pair<fs::path, long>> candidates;
  for (fs::directory_iterator it(d, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const auto [base, pid] = split_temporary(name);
    if (pid == 0 || !ours(base)) continue;
    candidates.emplace_back(dir.empty() ? fs::path(name) : it->path(), pid);
  }
  std::sort(candidates.begin(), candidates.end());
  const long self = long(::getpid());
  for (const auto& [p, pid] : candidates) {
    if (pid == self) {
      // Ours by name: stale unless this process made it (a dead process had our PID before).
      std::lock_guard<std::mutex> lk(g_mu);
      if (registered_locked(p)) continue;
    } else if (!process_gone(pid)) {
      continue;
    }
    StaleTemporary t;
    t.path = p;
    t.pid = pid;
    t.bytes = bytes_of(p);
    std::error_code e;
    fs::remove_all(p, e);
    if (e) t.error = e.message();
    out.push_back(std::move(t));
  }
  return out;
}

std::vector<StaleTemporary> remove_stale_temporaries(const fs::path& final_path) {
  const std::string name = final_path.filename().string();
  if (name.empty()) return {};
  return remove_stale_temporaries_in(final_path.parent_path(),
                                     [&](std::string_view base) { return base == name; });
}

void set_notice_sink(std::function<void(const std::string&)> sink) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_sink = std::move(sink);
}

void notice(const std::string& message) {
  std::function<void(const std::string&)> sink;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    sink = g_sink;
  }
  if (sink) sink(message);
}

void register_temporary(const fs::path& path) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (!registered_locked(path)) g_registered.push_back(path);
}

void unregister_temporary(const fs::path& path) {
  std::lock_guard<std::mutex> lk(g_mu);
  std::erase(g_registered, path);
}

fs::path register_new_temporary(const fs::path& final_path) {
  const fs::path tmp = temporary_path(final_path);
  register_temporary(tmp);
  return tmp;
}

fs::path claim_temporary(const fs::path& final_path) {
  for (const StaleTemporary& t : remove_stale_temporaries(final_path)) notice(describe(t));
  return register_new_temporary(final_path);
}

void set_interrupt_note(std::string note) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_note = std::move(note);
}

void install_interrupt_cleanup() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (::pipe2(g_pipe, O_CLOEXEC) != 0) return;  // then signals keep their default action
    std::thread(cleanup_thread).detach();
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
      struct sigaction old {};
      if (::sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) continue;
      struct sigaction sa {};
      sa.sa_handler = on_interrupt_signal;
      sa.sa_flags = SA_RESTART;
      sigemptyset(&sa.sa_mask);
      ::sigaction(sig, &sa, nullptr);
    }
  });
}

bool interrupt_pending() {
  return g_pending.load();
}

void wait_for_interrupt_cleanup() {
  g_mu.lock();  // the cleanup holds it until the process ends
  for (;;) ::pause();
}

std::vector<std::string> remove_registered_temporaries() {
  std::lock_guard<std::mutex> lk(g_mu);
  return remove_registered_locked();
}

}  // namespace nanscope
