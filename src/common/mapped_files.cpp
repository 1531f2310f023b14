#include "common/mapped_files.hpp"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>

namespace nanscope {

namespace {

// Read by the signal handler without a lock: a slot is published by storing `begin` last and
// retired by clearing it first.
struct Slot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<const char*> path{nullptr};
};
constexpr int kSlots = 4096;
Slot g_slots[kSlots];
std::mutex g_mu;  // registration only
struct sigaction g_previous {};
std::atomic<bool> g_installed{false};
std::atomic<bool> g_json{false};

// Appends s to buf[len..cap-1), keeping room for the NUL.
void append(char* buf, size_t cap, size_t& len, const char* s) {
  while (*s != '\0' && len + 1 < cap) buf[len++] = *s++;
  buf[len] = '\0';
}
void append_u64(char* buf, size_t cap, size_t& len, uint64_t v) {
  char digits[24];
  int n = 0;
  do {
    digits[n++] = char('0' + v % 10);
    v /= 10;
  } while (v != 0);
  char rev[24];
  for (int i = 0; i < n; ++i) rev[i] = digits[n - 1 - i];
  rev[n] = '\0';
  append(buf, cap, len, rev);
}

// Appends s as the inside of a JSON string (quotes, backslashes and control characters escaped).
void append_json_escaped(char* buf, size_t cap, size_t& len, const char* s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    char esc[7] = {0};
    if (c == '"' || c == '\\') {
      esc[0] = '\\', esc[1] = char(c);
    } else if (c < 0x20) {
      esc[0] = '\\', esc[1] = 'u', esc[2] = '0', esc[3] = '0', esc[4] = hex[c >> 4],
      esc[5] = hex[c & 15];
    } else {
      esc[0] = char(c);
    }
    append(buf, cap, len, esc);
  }
}

void write_all(int fd, const char* p, size_t n) {
  for (size_t done = 0; done < n;) {
    const ssize_t w = ::write(fd, p + done, n - done);
    if (w <= 0) break;
    done += size_t(w);
  }
}

extern "C" void on_sigbus(int sig, siginfo_t* info, void* ucontext) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
  for (Slot& s : g_slots) {
    const uintptr_t b = s.begin.load(std::memory_order_acquire);
    if (b == 0 || a < b || a >= s.end.load(std::memory_order_relaxed)) continue;
    const char* path = s.path.load(std::memory_order_relaxed);
    char msg[4096 + 256];
    const size_t n = format_mapping_fault(msg, sizeof msg, path ? path : "a mapped file",
                                          size_t(s.end.load(std::memory_order_relaxed) - b));
    write_all(STDERR_FILENO, msg, n);
    if (g_json.load(std::memory_order_relaxed)) {
      // The message without its "nanscope: error: " prefix and the newline.
      constexpr size_t kPrefix = sizeof("nanscope: error: ") - 1;
      const size_t body = n > kPrefix + 1 ? n - kPrefix - 1 : 0;
      char doc[2 * sizeof msg];
      size_t len = 0;
      doc[0] = '\0';
      append(doc, sizeof doc, len, "{\"error\": {\"kind\": \"changed\", \"file\": \"");
      const char* p = path ? path : "";
      append_json_escaped(doc, sizeof doc, len, p, std::strlen(p));
      append(doc, sizeof doc, len, "\", \"message\": \"");
      append_json_escaped(doc, sizeof doc, len, msg + kPrefix, body);
      append(doc, sizeof doc, len, "\"}}\n");
      write_all(STDOUT_FILENO, doc, len);
    }
    ::_exit(2);
  }
  // Not one of ours: what was there before handles it; returning re-runs the faulting access.
  if ((g_previous.sa_flags & SA_SIGINFO) && g_previous.sa_sigaction != nullptr) {
    g_previous.sa_sigaction(sig, info, ucontext);
    return;
  }
  if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN &&
      g_previous.sa_handler != nullptr) {
    g_previous.sa_handler(sig);
    return;
  }
  ::signal(SIGBUS, SIG_DFL);
}

}  // namespace

size_t format_mapping_fault(char* buf, size_t cap, const char* path, size_t mapped_size) {
  size_t len = 0;
  if (cap == 0) return 0;
  buf[0] = '\0';
  append(buf, cap, len, "nanscope: error: ");
  append(buf, cap, len, path);
  struct stat st {};
  if (::stat(path, &st) == 0 && uint64_t(st.st_size) < uint64_t(mapped_size)) {
    append(buf, cap, len, ": changed while reading: the file is now ");
    append_u64(buf, cap, len, uint64_t(st.st_size));
    append(buf, cap, len, " bytes, shorter than the ");
    append_u64(buf, cap, len, mapped_size);
    append(buf, cap, len, " it had when it was opened (another process is writing it?)\n");
  } else {
    // The same signal for a file replaced since (its new size says nothing) or a read error.
    append(buf, cap, len,
           ": changed while reading: part of the file could no longer be read (another "
           "process truncating it, or an I/O error of the disk or network file system?)\n");
  }
  return len;
}

int register_mapping(const void* begin, size_t size, const char* path) {
  if (begin == nullptr || size == 0) return -1;
  std::lock_guard<std::mutex> lk(g_mu);
  for (int i = 0; i < kSlots; ++i) {
    Slot& s = g_slots[i];
    if (s.begin.load(std::memory_order_relaxed) != 0) continue;
    s.path.store(path, std::memory_order_relaxed);
    s.end.store(reinterpret_cast<uintptr_t>(begin) + size, std::memory_order_relaxed);
    s.begin.store(reinterpret_cast<uintptr_t>(begin), std::memory_order_release);
    return i;
  }
  return -1;
}

void unregister_mapping(int slot) {
  if (slot < 0 || slot >= kSlots) return;
  std::lock_guard<std::mutex> lk(g_mu);
  g_slots[slot].begin.store(0, std::memory_order_release);
  g_slots[slot].end.store(0, std::memory_order_relaxed);
  g_slots[slot].path.store(nullptr, std::memory_order_relaxed);
}

void set_mapping_fault_json(bool on) {
  g_json.store(on, std::memory_order_relaxed);
}

void install_mapping_fault_handler() {
  if (g_installed.exchange(true)) return;
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGBUS, &sa, &g_previous);
}

}  // namespace nanscope
