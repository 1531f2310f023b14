#include "formats/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <thread>
#include <unordered_set>

#include "common/atomic_file.hpp"
#include "common/mapped_files.hpp"
#include "common/temp_files.hpp"

namespace nanscope {

namespace {

constexpr uint64_t kMaxHeaderSize = 100'000'000;  // the reference reader's limit
constexpr int kMaxJsonDepth = 128;                // serde_json's recursion limit

[[noreturn]] void reject(SafetensorsErrorKind kind, std::string_view what, const std::string& msg) {
  throw SafetensorsError(kind, fmt::format("{}: {}", what, msg));
}

// Offset of the first byte that breaks UTF-8 (strict: no overlongs, no surrogates, nothing past
// U+10FFFF), or npos when the whole buffer is valid.
size_t first_invalid_utf8(const unsigned char* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;  // overlong
      if (c == 0xed) hi = 0x9f;  // UTF-16 surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;  // overlong
      if (c == 0xf4) hi = 0x8f;  // past U+10FFFF
    } else {
      return i;
    }
    if (n - i < len) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      if ((s[i + k] & 0xc0) != 0x80) return i;
    }
    i += len;
  }
  return std::string::npos;
}

using json = nlohmann::json;

// Reads a JSON array of non-negative integers that fit in 64 bits; false if it is anything else.
bool read_u64_array(const json& j, std::vector<uint64_t>& out) {
  if (!j.is_array()) return false;
  out.clear();
  out.reserve(j.size());
  for (const json& v : j) {
    if (!v.is_number_unsigned()) return false;  // negative, fractional or > 2^64-1 (a float)
    out.push_back(v.get<uint64_t>());
  }
  return true;
}

}  // namespace

std::string_view error_kind_name(SafetensorsErrorKind k) {
  switch (k) {
    case SafetensorsErrorKind::TooSmall:
      return "too_small";
    case SafetensorsErrorKind::HeaderTooLarge:
      return "header_too_large";
    case SafetensorsErrorKind::HeaderOutOfBounds:
      return "header_out_of_bounds";
    case SafetensorsErrorKind::HeaderNotUtf8:
      return "header_not_utf8";
    case SafetensorsErrorKind::HeaderNotJson:
      return "header_not_json";
    case SafetensorsErrorKind::UnknownDtype:
      return "unknown_dtype";
    case SafetensorsErrorKind::MetadataNotString:
      return "metadata_not_string";
    case SafetensorsErrorKind::InvalidOffsets:
      return "invalid_offsets";
    case SafetensorsErrorKind::SizeOverflow:
      return "size_overflow";
    case SafetensorsErrorKind::TensorSizeMismatch:
      return "tensor_size_mismatch";
    case SafetensorsErrorKind::MisalignedSlice:
      return "misaligned_slice";
    case SafetensorsErrorKind::TrailingBytes:
      return "trailing_bytes";
    case SafetensorsErrorKind::Io:
      return "io";
    case SafetensorsErrorKind::Changed:
      return "changed";
  }
  return "unknown";
}

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= uint64_t(d);  // validated against overflow at parse time
  return n;
}

SafetensorsHeader parse_safetensors(std::span<const std::byte> file, std::string_view what) {
  using K = SafetensorsErrorKind;
  const uint64_t file_size = file.size();
  if (file_size < 8) {
    reject(K::TooSmall, what,
           fmt::format("file is {} bytes, shorter than the 8-byte header length (empty or "
                       "truncated file?)",
                       file_size));
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint64_t(file[size_t(i)]);
  if (n > kMaxHeaderSize) {
    reject(K::HeaderTooLarge, what,
           fmt::format("header length {} exceeds the {}-byte limit (truncated or not a "
                       "safetensors file?)",
                       n, kMaxHeaderSize));
  }
  if (n > file_size - 8) {
    reject(K::HeaderOutOfBounds, what,
           fmt::format("header length {} runs past the end of the {}-byte file (truncated "
                       "download?)",
                       n, file_size));
  }
  const auto* hbytes = reinterpret_cast<const unsigned char*>(file.data() + 8);
  if (size_t bad = first_invalid_utf8(hbytes, size_t(n)); bad != std::string::npos) {
    reject(K::HeaderNotUtf8, what,
           fmt::format("header is not valid UTF-8 (byte 0x{:02x} at header offset {}; corrupt "
                       "or not a safetensors file?)",
                       hbytes[bad], bad));
  }

  // Parse events: names and fields are checked for duplicates (legal JSON, but which would win?),
  // nesting is limited as serde_json limits it, and unknown fields of tensor entries, which the
  // reference reader ignores, are dropped instead of built into a DOM.
  std::vector<std::unordered_set<std::string>> keys_at_depth;  // keys of the open object at depth
  std::string duplicate;
  bool in_metadata = false;
  json::parser_callback_t on_event = [&](int depth, json::parse_event_t ev, json& parsed) {
    const size_t d = size_t(depth);
    switch (ev) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= kMaxJsonDepth) {
          reject(K::HeaderNotJson, what,
                 fmt::format("header nests deeper than {} levels", kMaxJsonDepth));
        }
        // End events are not reported inside dropped values, so a new object at depth d simply
        // starts a new key set for depth d + 1.
        if (ev == json::parse_event_t::object_start) {
          if (keys_at_depth.size() < d + 2) keys_at_depth.resize(d + 2);
          keys_at_depth[d + 1].clear();
        }
        return true;
      case json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (d <= 2 && d < keys_at_depth.size() && !keys_at_depth[d].insert(key).second &&
            duplicate.empty()) {
          duplicate = key;
        }
        if (d == 1) in_metadata = key == "__metadata__";
        if (d == 2 && !in_metadata) {
          return key == "dtype" || key == "shape" || key == "data_offsets";
        }
        return true;
      }
      default:
        return true;
    }
  };
  const char* hchars = reinterpret_cast<const char*>(hbytes);
  json root = json::parse(hchars, hchars + n, on_event, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    reject(K::HeaderNotJson, what, "header is not valid JSON (corrupt or not a safetensors file?)");
  }
  if (!root.is_object()) {
    reject(K::HeaderNotJson, what,
           fmt::format("header is a JSON {}, not an object", root.type_name()));
  }
  if (!duplicate.empty()) {
    reject(K::HeaderNotJson, what, fmt::format("header has the key \"{}\" twice", duplicate));
  }

  SafetensorsHeader h;
  h.header_size = n;
  h.tensors.reserve(root.size());
  std::vector<uint64_t> dims, offsets;
  for (auto it = root.cbegin(); it != root.cend(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == "__metadata__") {
      if (entry.is_null()) continue;  // the reference reader takes null as "no metadata"
      if (!entry.is_object()) {
        reject(K::HeaderNotJson, what,
               fmt::format("__metadata__ is a JSON {}, not an object", entry.type_name()));
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          reject(K::MetadataNotString, what,
                 fmt::format("__metadata__ value of \"{}\" is a JSON {}, not a string", key,
                             value.type_name()));
        }
        h.metadata.emplace(key, value.get<std::string>());
      }
      continue;
    }
    auto malformed = [&](std::string_view why) {
      reject(K::HeaderNotJson, what, fmt::format("tensor \"{}\": {}", name, why));
    };
    if (!entry.is_object()) malformed("entry is not an object");
    TensorInfo t;
    t.name = name;

    const auto dt = entry.find("dtype");
    if (dt == entry.end() || !dt->is_string()) malformed("\"dtype\" missing or not a string");
    const std::string& dname = dt->get_ref<const std::string&>();
    const std::optional<DType> parsed_dtype = parse_dtype(dname);
    if (!parsed_dtype) {
      reject(K::UnknownDtype, what,
             fmt::format("tensor \"{}\": unknown dtype \"{}\"", name, dname));
    }
    t.dtype = *parsed_dtype;

    const auto sh = entry.find("shape");
    if (sh == entry.end() || !read_u64_array(*sh, dims)) {
      malformed("\"shape\" missing or not an array of non-negative integers");
    }
    t.shape.reserve(dims.size());
    for (uint64_t d : dims) {
      if (d > uint64_t(INT64_MAX)) {
        reject(K::SizeOverflow, what,
               fmt::format("tensor \"{}\": dimension {} does not fit in 63 bits", name, d));
      }
      t.shape.push_back(int64_t(d));
    }

    const auto off = entry.find("data_offsets");
    if (off == entry.end() || !read_u64_array(*off, offsets) || offsets.size() != 2) {
      malformed("\"data_offsets\" missing or not [begin, end] in non-negative integers");
    }
    t.begin = offsets[0];
    t.end = offsets[1];
    h.tensors.push_back(std::move(t));
  }

  // Sorted by offsets as the reference reader does (stable: equal ranges keep name order).
  std::stable_sort(h.tensors.begin(), h.tensors.end(),
                   [](const TensorInfo& a, const TensorInfo& b) {
                     return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                   });
  uint64_t expected_begin = 0;
  for (const TensorInfo& t : h.tensors) {
    if (t.begin != expected_begin || t.end < t.begin) {
      reject(K::InvalidOffsets, what,
             fmt::format("tensor \"{}\": data_offsets [{}, {}] should begin at {} (tensors "
                         "sorted by offset must tile the data buffer without gap or overlap)",
                         t.name, t.begin, t.end, expected_begin));
    }
    expected_begin = t.end;
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (__builtin_mul_overflow(numel, uint64_t(d), &numel)) {
        reject(K::SizeOverflow, what,
               fmt::format("tensor \"{}\": element count of shape [{}] overflows 64 bits", t.name,
                           fmt::join(t.shape, ", ")));
      }
    }
    const int bits = dtype_bits(t.dtype);
    uint64_t nbits = 0;
    if (__builtin_mul_overflow(numel, uint64_t(bits), &nbits)) {
      reject(K::SizeOverflow, what,
             fmt::format("tensor \"{}\": size in bits of {} x {} overflows 64 bits", t.name, numel,
                         dtype_name(t.dtype)));
    }
    if (nbits % 8 != 0) {
      reject(K::MisalignedSlice, what,
             fmt::format("tensor \"{}\": {} elements of {} ({} bits each) do not fill whole "
                         "bytes",
                         t.name, numel, dtype_name(t.dtype), bits));
    }
    if (t.end - t.begin != nbits / 8) {
      reject(K::TensorSizeMismatch, what,
             fmt::format("tensor \"{}\": {} [{}] needs {} bytes but data_offsets [{}, {}] hold "
                         "{}",
                         t.name, dtype_name(t.dtype), fmt::join(t.shape, ", "), nbits / 8, t.begin,
                         t.end, t.end - t.begin));
    }
  }
  const uint64_t data_start = 8 + n;
  const uint64_t data_in_file = file_size - data_start;
  if (expected_begin != data_in_file) {
    if (expected_begin > data_in_file) {
      reject(K::TrailingBytes, what,
             fmt::format("tensors need {} data bytes but the file holds {} after the header "
                         "(truncated download?)",
                         expected_begin, data_in_file));
    }
    reject(K::TrailingBytes, what,
           fmt::format("{} bytes after the last tensor's data (tensors cover {} of {} data "
                       "bytes)",
                       data_in_file - expected_begin, expected_begin, data_in_file));
  }
  return h;
}

// ---- SafetensorsFile ------------------------------------------------------------------------

namespace {

[[noreturn]] void io_fail(const std::filesystem::path& path, std::string_view op, int err) {
  throw SafetensorsError(SafetensorsErrorKind::Io,
                         fmt::format("{}: {} failed: {}", path.string(), op, std::strerror(err)));
}

size_t page_size() {
  static const size_t p = size_t(::sysconf(_SC_PAGESIZE));
  return p;
}

}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::filesystem::path& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) io_fail(path, "open", errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    io_fail(path, "stat", err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw SafetensorsError(SafetensorsErrorKind::Io,
                           fmt::format("{}: not a regular file", path.string()));
  }
  f->size_ = uint64_t(st.st_size);
  if (f->size_ > 0) {  // mmap of length 0 fails; an empty file is TooSmall below
    void* p = ::mmap(nullptr, size_t(f->size_), PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      io_fail(path, "mmap", err);
    }
    f->base_ = static_cast<const std::byte*>(p);
    f->path_c_ = path.string();
    f->slot_ = register_mapping(p, size_t(f->size_), f->path_c_.c_str());
  }
  f->fd_ = fd;  // kept for check_unchanged(); the mapping alone would keep the file alive

  f->header_ =
      parse_safetensors(std::span<const std::byte>(f->base_, size_t(f->size_)), path.string());
  f->data_ = f->base_ + 8 + f->header_.header_size;
  for (size_t i = 0; i < f->header_.tensors.size(); ++i) {
    f->index_.emplace(f->header_.tensors[i].name, i);
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  unregister_mapping(slot_);
  if (base_ != nullptr) ::munmap(const_cast<std::byte*>(base_), size_t(size_));
  if (fd_ >= 0) ::close(fd_);
}

void SafetensorsFile::check_unchanged() const {
  struct stat st {};
  if (fd_ < 0 || ::fstat(fd_, &st) != 0) return;  // nothing to compare: the reads will tell
  if (uint64_t(st.st_size) == size_) return;
  throw SafetensorsError(
      SafetensorsErrorKind::Changed,
      fmt::format("{}: changed while reading: the file is now {} bytes, it had {} when it was "
                  "opened (another process is writing it?)",
                  path_.string(), uint64_t(st.st_size), size_));
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

std::span<const std::byte> SafetensorsFile::data(const TensorInfo& t) const {
  if (t.end < t.begin || t.end > header_.data_size()) {
    throw std::out_of_range(fmt::format("{}: tensor \"{}\" [{}, {}] is not inside this file",
                                        path_.string(), t.name, t.begin, t.end));
  }
  return {data_ + t.begin, size_t(t.end - t.begin)};
}

void SafetensorsFile::release(const TensorInfo& t) const {
  if (base_ == nullptr || t.end <= t.begin || t.end > header_.data_size()) return;
  release(std::span<const std::byte>(data_ + t.begin, size_t(t.end - t.begin)));
}

void SafetensorsFile::release(std::span<const std::byte> bytes) const {
  if (base_ == nullptr || bytes.empty()) return;
  // Only whole pages inside the range: the partial pages at either end may hold neighbours.
  const uintptr_t ps = page_size();
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(bytes.data()) + ps - 1) & ~(ps - 1);
  const uintptr_t hi = reinterpret_cast<uintptr_t>(bytes.data() + bytes.size()) & ~(ps - 1);
  if (lo < hi) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

// ---- SafetensorsWriter ----------------------------------------------------------------------

struct SafetensorsWriter::Impl {
  // O_DIRECT wants the buffer address, the file offset and the length aligned to the logical
  // block size of the device; 4096 covers every device in use.
  static constexpr size_t kAlign = 4096;
  static constexpr size_t kMaxChunk = size_t(8) << 20;
  // Up to 16 chunks (128 MB) between the caller and the disk: a caller faster than the disk for a
  // while (a copied embedding) runs ahead, so the disk does not wait when it is slower (LoRA
  // products). With 4 chunks the merge of the 0.6B synthetic took 1.02-1.54 s on the dev box,
  // with 16 0.92-1.15 s (8 runs each, interleaved), with 32 no better.
  static constexpr int kChunks = 16;

  std::filesystem::path path;
  std::filesystem::path tmp;
  int fd = -1;
  uint64_t header_bytes = 0;  // 8 + padded header
  uint64_t data_total = 0;
  uint64_t data_written = 0;
  bool committed = false;

  // The chunk being filled by the caller: file bytes [cur_offset, cur_offset + fill).
  size_t chunk = kMaxChunk;  // smaller for a small file
  std::vector<std::byte*> bufs;
  int cur = -1;
  int next = -1;  // the chunk after cur, taken by a reservation across cur's end
  size_t fill = 0;
  uint64_t cur_offset = 0;

  // Shared with the I/O thread, under mu.
  struct Job {
    int buf;
    uint64_t offset;
    size_t len;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Job> queue;
  std::vector<int> free_bufs;
  bool busy = false, stop = false;
  std::exception_ptr err;
  bool direct = false;    // fd has O_DIRECT (only the I/O thread clears it, then commit reads it)
  bool can_flush = true;  // false once sync_file_range is refused (not Linux, odd fs)
  bool durable = true;    // SafetensorsWriteOptions::durable
  std::thread io;

  ~Impl() {
    if (io.joinable()) {
      {
        std::lock_guard<std::mutex> lk(mu);
        stop = true;
      }
      cv.notify_all();
      io.join();
    }
    for (std::byte* b : bufs) std::free(b);
    if (fd >= 0) ::close(fd);
    if (!committed && !tmp.empty()) ::unlink(tmp.c_str());
    if (!tmp.empty()) unregister_temporary(tmp);
  }

  [[noreturn]] void write_failed(const char* what, int e) const {
    throw OutputError(fmt::format("{}: {} failed: {}", tmp.string(), what, std::strerror(e)));
  }

  // Writes [p, p + len) at offset. A file system that refuses O_DIRECT for this write (EINVAL:
  // alignment it does not support) gets it, and every later one, through the page cache.
  void pwrite_all(const std::byte* p, size_t len, uint64_t offset) {
    while (len > 0) {
      const ssize_t r = ::pwrite(fd, p, std::min<size_t>(len, size_t(1) << 30), off_t(offset));
      if (r < 0) {
        if (errno == EINTR) continue;
        if (errno == EINVAL && direct) {
          set_direct(false);
          continue;
        }
        write_failed("write", errno);
      }
      if (r == 0)
        throw OutputError(fmt::format("{}: write wrote nothing (disk full?)", tmp.string()));
      p += r;
      len -= size_t(r);
      offset += uint64_t(r);
    }
  }

  void set_direct(bool on) {
    const int fl = ::fcntl(fd, F_GETFL);
    if (fl < 0 || ::fcntl(fd, F_SETFL, on ? (fl | O_DIRECT) : (fl & ~O_DIRECT)) != 0)
      write_failed("fcntl(O_DIRECT)", errno);
    direct = on;
  }

  void io_loop() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return !queue.empty() || stop; });
        if (queue.empty()) return;
        job = queue.front();
        queue.pop_front();
        busy = !err;
      }
      if (busy) {
        try {
          pwrite_all(bufs[size_t(job.buf)], job.len, job.offset);
          // Through the page cache: start writeback now, so that dirty pages do not pile up
          // until commit() (the disk works while the caller computes, the final fsync has
          // little left to do, the writer is not throttled). Only a hint: commit() fsyncs.
#ifdef __linux__
          if (!direct && durable && can_flush &&
              ::sync_file_range(fd, off_t(job.offset), off_t(job.len), SYNC_FILE_RANGE_WRITE) != 0)
            can_flush = false;
#endif
        } catch (...) {
          std::lock_guard<std::mutex> lk(mu);
          err = std::current_exception();
        }
      }
      {
        std::lock_guard<std::mutex> lk(mu);
        free_bufs.push_back(job.buf);
        busy = false;
      }
      cv.notify_all();
    }
  }

  void rethrow_locked() {
    if (err) std::rethrow_exception(err);
  }

  // A free chunk buffer; allocated on first use, up to kChunks.
  int acquire() {
    std::unique_lock<std::mutex> lk(mu);
    if (free_bufs.empty() && bufs.size() < size_t(kChunks)) {
      void* b = std::aligned_alloc(kAlign, chunk);
      if (b == nullptr) throw std::bad_alloc();
      bufs.push_back(static_cast<std::byte*>(b));
      return int(bufs.size()) - 1;
    }
    cv.wait(lk, [&] { return !free_bufs.empty() || err; });
    rethrow_locked();
    const int b = free_bufs.back();
    free_bufs.pop_back();
    return b;
  }

  void submit(int buf, uint64_t offset, size_t len) {
    {
      std::lock_guard<std::mutex> lk(mu);
      queue.push_back({buf, offset, len});
    }
    cv.notify_all();
  }

  void drain() {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return queue.empty() && !busy; });
    rethrow_locked();
  }

  // The free space of the current chunk (a fresh chunk when none is open).
  std::span<std::byte> room() {
    if (cur < 0) {
      cur = acquire();
      fill = 0;
    }
    return {bufs[size_t(cur)] + fill, chunk - fill};
  }

  // The start of the chunk after the current one, for a reservation across its end.
  std::span<std::byte> next_room() {
    if (next < 0) next = acquire();
    return {bufs[size_t(next)], chunk};
  }

  // n bytes of room() (and next_room()) filled: a full chunk goes to the I/O thread.
  void advance(size_t n) {
    while (n > 0) {
      if (cur < 0)
        throw std::logic_error(fmt::format("{}: advance past the room given", path.string()));
      const size_t k = std::min(n, chunk - fill);
      fill += k;
      n -= k;
      if (fill == chunk) {
        submit(cur, cur_offset, chunk);
        cur_offset += chunk;
        cur = next;
        next = -1;
        fill = 0;
      }
    }
  }

  void append(const std::byte* p, size_t len) {
    while (len > 0) {
      const std::span<std::byte> r = room();
      const size_t n = std::min(len, r.size());
      std::memcpy(r.data(), p, n);
      advance(n);
      p += n;
      len -= n;
    }
  }

  // The last, partial chunk: its aligned part as the others, the tail (not a whole block, which
  // O_DIRECT cannot write) through the page cache.
  void finish() {
    drain();
    if (cur < 0) return;
    const size_t aligned = fill & ~(kAlign - 1);
    if (aligned > 0) pwrite_all(bufs[size_t(cur)], aligned, cur_offset);
    if (fill > aligned) {
      if (direct) set_direct(false);
      pwrite_all(bufs[size_t(cur)] + aligned, fill - aligned, cur_offset + aligned);
    }
    std::lock_guard<std::mutex> lk(mu);
    free_bufs.push_back(cur);
    cur = -1;
  }
};

SafetensorsWriter::SafetensorsWriter(std::filesystem::path path, std::vector<TensorSpec> tensors,
                                     std::map<std::string, std::string> metadata,
                                     SafetensorsWriteOptions options)
    : impl_(std::make_unique<Impl>()) {
  Impl& w = *impl_;
  w.path = std::move(path);

  // The header, tensors in the order given, offsets consecutive, as compact JSON.
  std::string header = "{";
  auto quote = [&](const std::string& s) {
    try {
      return json(s).dump();
    } catch (const json::exception&) {
      fail("{}: name \"{}\" is not valid UTF-8", w.path.string(), s);
    }
  };
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    for (const auto& [key, value] : metadata) {
      if (!first) header += ',';
      first = false;
      header += quote(key) + ':' + quote(value);
    }
    header += '}';
    first = false;
  }
  std::unordered_set<std::string_view> seen;
  uint64_t offset = 0;
  for (const TensorSpec& t : tensors) {
    if (t.name == "__metadata__" || !seen.insert(t.name).second) {
      fail("{}: tensor name \"{}\" is reserved or given twice", w.path.string(), t.name);
    }
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0 || __builtin_mul_overflow(numel, uint64_t(d), &numel)) {
        fail("{}: tensor \"{}\" has an invalid shape [{}]", w.path.string(), t.name,
             fmt::join(t.shape, ", "));
      }
    }
    uint64_t nbits = 0;
    if (__builtin_mul_overflow(numel, uint64_t(dtype_bits(t.dtype)), &nbits) || nbits % 8 != 0 ||
        __builtin_add_overflow(offset, nbits / 8, &offset)) {
      fail("{}: tensor \"{}\" ({} [{}]) has no whole byte size", w.path.string(), t.name,
           dtype_name(t.dtype), fmt::join(t.shape, ", "));
    }
    if (!first) header += ',';
    first = false;
    header += fmt::format("{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                          quote(t.name), dtype_name(t.dtype), fmt::join(t.shape, ","),
                          offset - nbits / 8, offset);
  }
  header += '}';
  // Padded with spaces to a multiple of 8 so that the data buffer starts 8-byte aligned.
  header.append((8 - header.size() % 8) % 8, ' ');
  w.data_total = offset;
  w.header_bytes = 8 + header.size();

  const uint64_t file_size = w.header_bytes + w.data_total;
  w.chunk = size_t(std::min<uint64_t>(
      Impl::kMaxChunk, (file_size + Impl::kAlign - 1) & ~uint64_t(Impl::kAlign - 1)));

  const std::filesystem::path tmp = register_new_temporary(w.path);
  const int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC;
  w.durable = options.durable;
  w.fd = ::open(tmp.c_str(), flags | (options.direct ? O_DIRECT : 0), 0644);
  if (w.fd < 0 && options.direct && errno == EINVAL) {
    w.fd = ::open(tmp.c_str(), flags, 0644);  // the file system has no O_DIRECT (tmpfs)
  } else {
    w.direct = options.direct;
  }
  if (w.fd < 0) {
    const int e = errno;
    unregister_temporary(tmp);
    throw OutputError(fmt::format("{}: cannot create temporary file {}: {}", w.path.string(),
                                  tmp.string(), std::strerror(e)));
  }
  w.tmp = tmp;  // from here on ours to remove if not committed
  // Direct writes land in extents reserved up front: no block allocation and no size update
  // per write, and the file in one piece. Only an optimisation: refused, the writes allocate.
  if (w.direct && file_size > 0) (void)::fallocate(w.fd, 0, 0, off_t(file_size));
  w.io = std::thread([&w] { w.io_loop(); });
  std::byte len[8];
  for (int i = 0; i < 8; ++i) len[i] = std::byte((header.size() >> (8 * i)) & 0xff);
  w.append(len, 8);
  w.append(reinterpret_cast<const std::byte*>(header.data()), header.size());
}

SafetensorsWriter::~SafetensorsWriter() = default;  // Impl closes and unlinks if not committed

void SafetensorsWriter::write(std::span<const std::byte> bytes) {
  Impl& w = *impl_;
  if (w.committed || w.fd < 0) {
    throw std::logic_error(fmt::format("{}: write after commit", w.path.string()));
  }
  if (bytes.size() > w.data_total - w.data_written) {
    throw std::logic_error(fmt::format("{}: {} more bytes than the {} the tensors declare",
                                       w.path.string(),
                                       w.data_written + bytes.size() - w.data_total, w.data_total));
  }
  {
    std::lock_guard<std::mutex> lk(w.mu);
    w.rethrow_locked();
  }
  w.append(bytes.data(), bytes.size());
  w.data_written += bytes.size();
}

std::span<std::byte> SafetensorsWriter::room(size_t max) {
  Impl& w = *impl_;
  if (w.committed || w.fd < 0) {
    throw std::logic_error(fmt::format("{}: write after commit", w.path.string()));
  }
  {
    std::lock_guard<std::mutex> lk(w.mu);
    w.rethrow_locked();
  }
  max = size_t(std::min<uint64_t>(max, w.data_total - w.data_written));
  if (max == 0) return {};
  const std::span<std::byte> r = w.room();
  return r.first(std::min(max, r.size()));
}

std::pair<std::span<std::byte>, std::span<std::byte>> SafetensorsWriter::reserve(size_t n) {
  Impl& w = *impl_;
  if (n > w.chunk) {
    throw std::logic_error(
        fmt::format("{}: reserve({}) of more than a chunk ({})", w.path.string(), n, w.chunk));
  }
  const std::span<std::byte> first = room(n);
  if (first.size() < n && n <= w.data_total - w.data_written)
    return {first, w.next_room().first(n - first.size())};
  return {first, {}};
}

void SafetensorsWriter::advance(size_t n) {
  Impl& w = *impl_;
  if (n > w.data_total - w.data_written) {
    throw std::logic_error(fmt::format("{}: advance({}) past the {} bytes declared",
                                       w.path.string(), n, w.data_total));
  }
  w.advance(n);
  w.data_written += n;
}

size_t SafetensorsWriter::chunk_size() const {
  return impl_->chunk;
}

void SafetensorsWriter::commit() {
  Impl& w = *impl_;
  if (w.committed || w.fd < 0) {
    throw std::logic_error(fmt::format("{}: commit called twice", w.path.string()));
  }
  if (w.data_written != w.data_total) {
    throw std::logic_error(fmt::format("{}: commit after {} of {} data bytes", w.path.string(),
                                       w.data_written, w.data_total));
  }
  w.finish();
  if (w.durable && ::fsync(w.fd) != 0) {
    throw OutputError(fmt::format("{}: fsync failed: {}", w.tmp.string(), std::strerror(errno)));
  }
  const int fd = w.fd;
  w.fd = -1;
  if (::close(fd) != 0) {
    throw OutputError(fmt::format("{}: close failed: {}", w.tmp.string(), std::strerror(errno)));
  }
  if (::rename(w.tmp.c_str(), w.path.c_str()) != 0) {
    throw OutputError(fmt::format("{}: rename from {} failed: {}", w.path.string(), w.tmp.string(),
                                  std::strerror(errno)));
  }
  w.committed = true;
  unregister_temporary(w.tmp);
  if (!w.durable) return;
  // Make the rename itself durable.
  fsync_dir_quietly(w.path.parent_path().empty() ? "." : w.path.parent_path());
}

bool SafetensorsWriter::direct() const {
  return impl_->direct;
}

uint64_t SafetensorsWriter::total_bytes() const {
  return impl_->header_bytes + impl_->data_total;
}

}  // namespace nanscope
