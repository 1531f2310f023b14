// safetensors: a validating reader on mmap with zero-copy tensor views, and a streaming writer
// that never leaves a half-written file visible.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/error.hpp"
#include "numerics/dtype.hpp"

namespace nanscope {

// One error kind per way a file can be wrong (the rules of the reference reader).
enum class SafetensorsErrorKind {
  TooSmall,            // file shorter than the 8-byte header length
  HeaderTooLarge,      // N > 100,000,000
  HeaderOutOfBounds,   // 8 + N past the end of the file
  HeaderNotUtf8,       // header bytes are not valid UTF-8
  HeaderNotJson,       // header is not a JSON object of the expected form
  UnknownDtype,        // dtype string not known
  MetadataNotString,   // __metadata__ value that is not a string
  InvalidOffsets,      // offsets not contiguous when sorted (gap, overlap, not starting at 0)
  SizeOverflow,        // element count or byte count overflows 64 bits
  TensorSizeMismatch,  // end - begin differs from elements x dtype size
  MisalignedSlice,     // elements x bits of a sub-byte dtype (F4, F6) is not a whole byte count
  TrailingBytes,       // data buffer does not cover the file exactly
  Io,                  // open / stat / mmap failed
  Changed,             // the file's size changed after it was opened (another process writing it)
};
std::string_view error_kind_name(SafetensorsErrorKind k);

class SafetensorsError : public InputError {
 public:
  SafetensorsError(SafetensorsErrorKind kind, const std::string& message)
      : InputError(message), kind_(kind) {}
  SafetensorsErrorKind kind() const { return kind_; }

 private:
  SafetensorsErrorKind kind_;
};

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets relative to the data buffer, end exclusive
  uint64_t end = 0;
  uint64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

struct SafetensorsHeader {
  uint64_t header_size = 0;         // N
  std::vector<TensorInfo> tensors;  // in file order (sorted by begin)
  std::map<std::string, std::string> metadata;
  uint64_t data_size() const { return tensors.empty() ? 0 : tensors.back().end; }
};

// Validates a whole file given its bytes: the header and that the data covers the rest exactly.
// `what` names the file in messages. Total: every byte sequence either parses or throws
// SafetensorsError; this is the function the fuzz target drives.
SafetensorsHeader parse_safetensors(std::span<const std::byte> file, std::string_view what);

// A read-only mapped file. Tensor views point into the mapping (zero-copy).
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  const TensorInfo* find(std::string_view name) const;
  std::span<const std::byte> data(const TensorInfo& t) const;
  uint64_t file_size() const { return size_; }
  // Throws SafetensorsError (Changed) when the file is no longer the size it had when opened:
  // another process is writing it. For safe points between reads; a file that shrinks during a
  // read raises SIGBUS instead, which common/mapped_files.hpp turns into a message and exit 2.
  void check_unchanged() const;
  // Hands the pages of a tensor back to the kernel once the caller is done with them, so that
  // reading a whole model keeps memory flat.
  void release(const TensorInfo& t) const;
  // The same for part of a tensor's bytes (a view returned by data()), for chunked readers.
  void release(std::span<const std::byte> bytes) const;

 private:
  SafetensorsFile() = default;
  std::filesystem::path path_;
  const std::byte* base_ = nullptr;  // start of the mapping
  uint64_t size_ = 0;
  const std::byte* data_ = nullptr;  // start of the data buffer
  int fd_ = -1;
  int slot_ = -1;       // in the table of mappings the SIGBUS handler reads
  std::string path_c_;  // path_ as the handler prints it
  SafetensorsHeader header_;
  std::map<std::string, size_t, std::less<>> index_;
};

// What the writer needs to know of each tensor before any data is written.
struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

// How a SafetensorsWriter puts its bytes on disk.
struct SafetensorsWriteOptions {
  // Write around the page cache (O_DIRECT) where the file system allows it, falling back to
  // ordinary writes where it does not (tmpfs, some network file systems). For a large file that
  // is written once and fsynced anyway (merge): no copy into the page cache, no freshly
  // allocated page per 4 KB, no dirty pages for the flusher; the disk is fed straight from the
  // writer's buffers. The finished file is then not in the page cache.
  bool direct = false;
  // fsync the file before renaming it into place (and its directory after): the whole file
  // survives a power cut too. false: the bytes are left to the kernel's writeback, as cp leaves
  // them (no early writeback either); a killed process still leaves nothing or the whole file.
  bool durable = true;
};

// Writes a safetensors file: header padded with spaces to a multiple of 8, tensors streamed in
// the order given (each with write()), to "<path>.tmp-<pid>" and renamed into place by commit().
// Destroyed without commit(), the temporary file is removed.
// Bytes are gathered into 8 MB chunks that a thread of the writer's own writes out at their
// offsets while the caller fills the next ones: write() only copies, room() does not.
class SafetensorsWriter {
 public:
  SafetensorsWriter(std::filesystem::path path, std::vector<TensorSpec> tensors,
                    std::map<std::string, std::string> metadata = {},
                    SafetensorsWriteOptions options = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Appends the bytes of the next tensor (must be the next in order; may be called several
  // times per tensor with consecutive chunks). Throws OutputError on a failed write (full disk),
  // possibly of bytes given to an earlier call.
  void write(std::span<const std::byte> bytes);
  // The same without the copy: room(max) is the writable space at the current position (up to
  // max bytes, the rest of the current chunk; empty only when every declared byte is written),
  // which the caller fills and hands over with advance(n), n <= its size. A producer can thus
  // compute straight into the bytes that go to disk.
  std::span<std::byte> room(size_t max);
  // The next n bytes (n <= chunk_size()) as one span, or two where a chunk ends inside them;
  // filled by the caller and handed over with advance(n).
  std::pair<std::span<std::byte>, std::span<std::byte>> reserve(size_t n);
  void advance(size_t n);
  size_t chunk_size() const;
  void commit();                 // checks that every byte was written, fsyncs, renames into place
  uint64_t total_bytes() const;  // size of the finished file: 8 + padded header + data
  bool direct() const;           // whether the data went around the page cache (O_DIRECT)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nanscope
