// Flat hash tables of the BPE model: token spellings, merges, and the per-word result cache.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace nanscope::bpe_internal {

// (left id, right id) -> (rank, merged id), open addressing: the merge loop's hot lookup.
class MergeTable {
 public:
  struct Value {
    uint32_t rank;
    int32_t id;
  };
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    keys_.assign(cap, kEmpty);
    values_.assign(cap, {});
    mask_ = cap - 1;
  }
  // A later duplicate replaces the earlier one, as when the library collects merges into a map.
  void insert(int32_t a, int32_t b, Value v) {
    const uint64_t k = key(a, b);
    size_t i = slot(k);
    while (keys_[i] != kEmpty && keys_[i] != k) i = (i + 1) & mask_;
    keys_[i] = k;
    values_[i] = v;
  }
  const Value* find(int32_t a, int32_t b) const {
    const uint64_t k = key(a, b);
    for (size_t i = slot(k);; i = (i + 1) & mask_) {
      if (keys_[i] == k) return &values_[i];
      if (keys_[i] == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  static uint64_t key(int32_t a, int32_t b) {
    return (uint64_t{static_cast<uint32_t>(a)} << 32) | static_cast<uint32_t>(b);
  }
  size_t slot(uint64_t k) const {
    return static_cast<size_t>((k * 0x9E3779B97F4A7C15ull) >> 20) & mask_;
  }
  std::vector<uint64_t> keys_;
  std::vector<Value> values_;
  size_t mask_ = 0;
};

// Token spelling -> id, open addressing over one byte arena: the load resolves ~450k spellings
// (three per merge), and a node-based map spends most of that time in cache misses.
class TokenTable {
 public:
  void reserve(size_t n, size_t bytes) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    slots_.assign(cap, Slot{0, -1});
    mask_ = cap - 1;
    entries_.reserve(n);
    arena_.reserve(bytes);
  }
  // Returns false if the spelling is already present (the first id is kept).
  bool insert(std::string_view token, int32_t id) {
    const uint32_t h = hash(token);
    size_t i = h & mask_;
    for (; slots_[i].entry >= 0; i = (i + 1) & mask_) {
      if (slots_[i].hash == h && view(slots_[i].entry) == token) return false;
    }
    slots_[i] = {h, static_cast<int32_t>(entries_.size())};
    entries_.push_back({arena_.size(), token.size(), id});
    arena_.append(token);
    return true;
  }
  std::optional<int32_t> find(std::string_view token) const {
    if (slots_.empty()) return std::nullopt;
    const uint32_t h = hash(token);
    for (size_t i = h & mask_; slots_[i].entry >= 0; i = (i + 1) & mask_) {
      if (slots_[i].hash == h && view(slots_[i].entry) == token) {
        return entries_[slots_[i].entry].id;
      }
    }
    return std::nullopt;
  }
  size_t size() const { return entries_.size(); }
  // Entry k's spelling and id; views stay valid once loading is over (no more inserts).
  std::string_view view(size_t k) const {
    return std::string_view(arena_).substr(entries_[k].offset, entries_[k].length);
  }
  int32_t id(size_t k) const { return entries_[k].id; }

 private:
  struct Slot {
    uint32_t hash;
    int32_t entry;
  };
  struct Entry {
    size_t offset;
    size_t length;
    int32_t id;
  };
  static uint32_t hash(std::string_view s) {
    uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a, then a final mix for the low bits
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    return static_cast<uint32_t>(h ^ (h >> 32));
  }
  std::vector<Slot> slots_;
  std::vector<Entry> entries_;
  std::string arena_;
  size_t mask_ = 0;
};

// Word (raw bytes) -> ids of its merge result, like the library's BPE cache: insert-only up to a
// capacity, then lookups only. Open addressing over two arenas keeps a hit to one or two cache
// lines. Sharded by hash so that threads of encode_batch rarely touch the same lock.
class WordCache {
 public:
  bool find(std::string_view word, uint64_t h, std::vector<int32_t>& out) const {
    return shards_[h >> 60].find(word, h, out);
  }
  void insert(std::string_view word, uint64_t h, std::span<const int32_t> ids) {
    shards_[h >> 60].insert(word, h, ids);
  }
  static uint64_t hash(std::string_view s) {
    uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a, then a mix so both ends of h are usable
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ull;
    return h ^ (h >> 29);
  }

 private:
  // 16 shards of 2048 words: 32768 in all. Half full at most, so probes stay short; words are
  // < 256 bytes, so arena offsets fit 32 bits.
  class alignas(64) Shard {
   public:
    Shard() : slots_(kSlots) {}
    bool find(std::string_view word, uint64_t h, std::vector<int32_t>& out) const {
      std::shared_lock lock(mutex_);
      const Slot* s = probe(word, h);
      if (!s->used) return false;
      out.insert(out.end(), ids_.begin() + s->ids_off, ids_.begin() + s->ids_off + s->ids_len);
      return true;
    }
    void insert(std::string_view word, uint64_t h, std::span<const int32_t> ids) {
      std::unique_lock lock(mutex_);
      if (count_ >= kCapacity) return;
      Slot* s = const_cast<Slot*>(probe(word, h));
      if (s->used) return;  // another thread got there first
      *s = {h,
            static_cast<uint32_t>(keys_.size()),
            static_cast<uint32_t>(word.size()),
            static_cast<uint32_t>(ids_.size()),
            static_cast<uint32_t>(ids.size()),
            true};
      keys_.append(word);
      ids_.insert(ids_.end(), ids.begin(), ids.end());
      ++count_;
    }

   private:
    static constexpr size_t kCapacity = 2048;
    static constexpr size_t kSlots = 2 * kCapacity;
    static constexpr size_t kMask = kSlots - 1;
    struct Slot {
      uint64_t hash = 0;
      uint32_t key_off = 0, key_len = 0, ids_off = 0, ids_len = 0;
      bool used = false;
    };
    // The slot holding `word`, or the empty slot where it would go.
    const Slot* probe(std::string_view word, uint64_t h) const {
      for (size_t i = h & kMask;; i = (i + 1) & kMask) {
        const Slot& s = slots_[i];
        if (!s.used || (s.hash == h && s.key_len == word.size() &&
                        std::memcmp(keys_.data() + s.key_off, word.data(), word.size()) == 0)) {
          return &s;
        }
      }
    }
    mutable std::shared_mutex mutex_;
    std::vector<Slot> slots_;
    std::string keys_;
    std::vector<int32_t> ids_;
    size_t count_ = 0;
  };
  std::array<Shard, 16> shards_;
};

}  // namespace nanscope::bpe_internal
