// Reading what `nanscope hidden` wrote: one output directory, a merged index, or the slices of a
// sharded run (--shard K/N) read as one, in input order. Used by `hidden --merge-index` and by
// Python's nanscope.HiddenStates.
//
//   HiddenSet s = HiddenSet::open({"out"});            // out/slice-*-of-* or out/index.json
//   for (const HiddenEntry& e : s.entries())           // in the order of the input file
//     std::vector<float> h = s.read(e, 5);             // state 5, float32, shape s.shape(e)
//   write_merged_index(s, "out");                      // out/index.json naming every slice's files
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace nanscope {

class SafetensorsFile;

struct HiddenEntry {
  std::string id;
  std::filesystem::path file;  // the shard holding its tensors
  int64_t input_index = -1;    // position in the input file; -1 in indexes older than slices
  int64_t tokens = 0;
  std::string kind;  // "ids" | "soft" | "mixed"
  bool finite = true;
  std::vector<int64_t> nonfinite_layers;
  size_t dir = 0;  // which of HiddenSet::dirs()
};

// True when the index.json at this path was written by write_merged_index.
bool is_merged_index(const std::filesystem::path& index_json);

class HiddenSet {
 public:
  // Each path is an output directory of `hidden` (holding index.json), a directory holding
  // slice-K-of-N directories (read directly, so the set is current while slices still run), or
  // one holding a merged index. Throws InputError for a missing or foreign index, slices of
  // different runs (other settings, N, or input files), or an id found twice.
  static HiddenSet open(std::span<const std::filesystem::path> paths);

  // The settings every directory shares (as in index.json, without "slice").
  const nlohmann::json& settings() const { return settings_; }
  std::vector<int64_t> layers() const;
  // The directories read, in order (each slice's own directory).
  const std::vector<std::filesystem::path>& dirs() const { return dirs_; }
  // In input order: by input_index, then (older indexes) directory and shard.
  const std::vector<HiddenEntry>& entries() const { return entries_; }
  const HiddenEntry* find(std::string_view id) const;
  // N of the slices read (1 without slices), and the K of those not found.
  int64_t slice_count() const { return slice_count_; }
  const std::vector<int64_t>& missing_slices() const { return missing_; }

  // Shape of each tensor of an entry: [T, H], or [H] when pooled.
  std::vector<int64_t> shape(const HiddenEntry& e) const;
  // State `layer` (0..N, -1 = N) of an entry as float32 (widened exactly from a run-dtype
  // shard). Throws InputError for a state not kept, or a shard that lacks the tensor.
  std::vector<float> read(const HiddenEntry& e, int64_t layer) const;

 private:
  nlohmann::json settings_;
  std::vector<std::filesystem::path> dirs_;
  std::vector<HiddenEntry> entries_;
  std::map<std::string, size_t, std::less<>> by_id_;
  int64_t slice_count_ = 1;
  std::vector<int64_t> missing_;
  // Shards opened so far (read() may run in several threads: Python releases the GIL).
  mutable std::shared_ptr<std::mutex> mu_ = std::make_shared<std::mutex>();
  mutable std::map<std::filesystem::path, std::shared_ptr<SafetensorsFile>> files_;
};

// Writes OUT/index.json (atomically) naming every input of the set with its shard's path
// relative to OUT, in the documented index format plus "slices", "missing_slices" and "order"
// (the ids in input order). Returns the document written.
nlohmann::json write_merged_index(const HiddenSet& set, const std::filesystem::path& out);

}  // namespace nanscope
