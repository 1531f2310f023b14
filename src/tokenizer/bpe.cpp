#include "tokenizer/bpe.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <thread>
#include <unordered_map>

#include "common/error.hpp"
#include "tokenizer/regex.hpp"
#include "tokenizer/text.hpp"

namespace nanscope {
namespace {

using json = nlohmann::json;

// What ByteLevel(use_regex=true) splits with (GPT-2's pattern, as in the tokenizers library).
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Words this long or longer are not cached (the tokenizers library uses the same bound).
constexpr size_t kCacheMaxWordBytes = 256;

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
  bool normalized = false;
};

// A piece of text between added tokens (token < 0) or one added token.
struct Segment {
  size_t begin, end;
  int32_t token;
};

// Finds added tokens leftmost-longest, non-overlapping, like the tokenizers library's
// Aho-Corasick (MatchKind::LeftmostLongest) with the lstrip / rstrip / single_word rules.
class AddedMatcher {
 public:
  void add(std::string pattern, const AddedToken* token) {
    if (pattern.empty()) return;
    entries_.push_back({std::move(pattern), token});
  }
  void finish() {
    // Longest first so the first hit at a position is the longest one.
    std::stable_sort(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) {
      return a.pattern.size() > b.pattern.size();
    });
    for (size_t i = 0; i < entries_.size(); ++i) {
      by_first_byte_[static_cast<unsigned char>(entries_[i].pattern[0])].push_back(i);
    }
  }
  bool empty() const { return entries_.empty(); }

  void split(std::string_view s, std::vector<Segment>& out) const {
    out.clear();
    size_t done = 0;  // end of the last emitted segment
    size_t pos = 0;
    while (pos < s.size()) {
      const auto& candidates = by_first_byte_[static_cast<unsigned char>(s[pos])];
      const Entry* hit = nullptr;
      for (size_t i : candidates) {
        const std::string& p = entries_[i].pattern;
        if (s.compare(pos, p.size(), p) == 0) {
          hit = &entries_[i];
          break;
        }
      }
      if (hit == nullptr) {
        ++pos;
        continue;
      }
      size_t start = pos, stop = pos + hit->pattern.size();
      pos = stop;
      const AddedToken& t = *hit->token;
      if (t.single_word && (!word_boundary_before(s, start) || !word_boundary_after(s, stop))) {
        continue;
      }
      if (t.lstrip) start = std::max(done, whitespace_run_start(s, start));
      if (t.rstrip) stop = whitespace_run_end(s, stop);
      if (start > done) out.push_back({done, start, -1});
      out.push_back({start, stop, t.id});
      done = stop;
      pos = stop;
    }
    if (done < s.size() || s.empty()) out.push_back({done, s.size(), -1});
  }

 private:
  struct Entry {
    std::string pattern;
    const AddedToken* token;
  };

  static size_t previous_boundary(std::string_view s, size_t i) {
    do {
      --i;
    } while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80);
    return i;
  }
  static bool word_boundary_before(std::string_view s, size_t start) {
    if (start == 0) return true;
    size_t i = previous_boundary(s, start);
    return !text::is_word_char(text::next_code_point(s, i));
  }
  static bool word_boundary_after(std::string_view s, size_t stop) {
    if (stop == s.size()) return true;
    size_t i = stop;
    return !text::is_word_char(text::next_code_point(s, i));
  }
  static size_t whitespace_run_start(std::string_view s, size_t start) {
    while (start > 0) {
      size_t i = previous_boundary(s, start);
      size_t j = i;
      if (!text::is_white_space(text::next_code_point(s, j))) break;
      start = i;
    }
    return start;
  }
  static size_t whitespace_run_end(std::string_view s, size_t stop) {
    while (stop < s.size()) {
      size_t j = stop;
      if (!text::is_white_space(text::next_code_point(s, j))) break;
      stop = j;
    }
    return stop;
  }

  std::vector<Entry> entries_;
  std::array<std::vector<size_t>, 256> by_first_byte_;
};

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

struct Stage {
  std::unique_ptr<SplitRegex> regex;  // null: the stage does not split
  bool remove_matches = false;        // Split behavior "Removed"
  bool add_prefix_space = false;      // ByteLevel
};

// One entry of the post-processor's "single" template: the sequence itself or fixed ids.
struct TemplatePart {
  bool is_sequence = false;
  std::vector<int32_t> ids;
};

std::string json_type_name(const json& j) {
  if (j.is_object() && j.contains("type") && j["type"].is_string()) {
    return j["type"].get<std::string>();
  }
  return j.is_null() ? "null" : j.dump().substr(0, 60);
}

bool get_bool(const json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  return it->get<bool>();
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("tokenizer: cannot read {}: {}", path.string(), std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail("tokenizer: cannot read {}: {}", path.string(), std::strerror(errno));
  return std::move(ss).str();
}

// model.vocab and model.merges hold ~150k entries each; building them as a JSON DOM (a std::map
// per object, a heap string per value) costs most of the load time. This SAX handler builds the
// DOM for everything else and streams those two straight into flat vectors.
struct RawModel {
  bool has_vocab = false;
  bool has_merges = false;
  std::vector<std::pair<std::string, int64_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merges;
};

class TokenizerJsonSax : public nlohmann::json_sax<json> {
 public:
  TokenizerJsonSax(json& root, RawModel& raw, std::string_view source)
      : dom_(root, true), raw_(raw), source_(source) {}

  bool null() override { return mode_ == kNormal ? dom_.null() : bad("null"); }
  bool boolean(bool v) override { return mode_ == kNormal ? dom_.boolean(v) : bad("a boolean"); }
  bool number_integer(number_integer_t v) override {
    if (mode_ == kVocab) return vocab_id(v);
    return mode_ == kNormal ? dom_.number_integer(v) : bad("a number");
  }
  bool number_unsigned(number_unsigned_t v) override {
    if (mode_ == kVocab) return vocab_id(v > INT64_MAX ? -1 : static_cast<int64_t>(v));
    return mode_ == kNormal ? dom_.number_unsigned(v) : bad("a number");
  }
  bool number_float(number_float_t v, const string_t& s) override {
    return mode_ == kNormal ? dom_.number_float(v, s) : bad("a number");
  }
  bool string(string_t& v) override {
    if (mode_ == kNormal) return dom_.string(v);
    if (mode_ == kMerges && depth_ == mode_depth_) {
      const size_t sp = v.find(' ');
      if (sp == std::string::npos || v.find(' ', sp + 1) != std::string::npos) {
        fail("tokenizer: {}: merge #{} \"{}\" is not two tokens separated by one space", source_,
             raw_.merges.size(), v);
      }
      raw_.merges.emplace_back(v.substr(0, sp), v.substr(sp + 1));
      return true;
    }
    if (mode_ == kMerges && depth_ == mode_depth_ + 1) {
      pair_.push_back(std::move(v));
      return true;
    }
    return bad("a string");
  }
  bool binary(binary_t& v) override { return mode_ == kNormal ? dom_.binary(v) : bad("binary"); }
  bool start_object(std::size_t n) override {
    if (mode_ == kNormal && depth_ == 2 && root_key_ == "model" && model_key_ == "vocab") {
      return enter(kVocab);
    }
    if (mode_ != kNormal) return bad("an object");
    ++depth_;
    return dom_.start_object(n);
  }
  bool key(string_t& k) override {
    if (mode_ == kVocab) {
      key_ = std::move(k);
      return true;
    }
    if (mode_ != kNormal) return bad("a key");
    if (depth_ == 1) root_key_ = k;
    if (depth_ == 2) model_key_ = k;
    return dom_.key(k);
  }
  bool end_object() override {
    if (mode_ == kVocab) {
      mode_ = kNormal;
      --depth_;
      return true;
    }
    if (mode_ != kNormal) return bad("an object");
    --depth_;
    return dom_.end_object();
  }
  bool start_array(std::size_t n) override {
    if (mode_ == kNormal && depth_ == 2 && root_key_ == "model" && model_key_ == "merges") {
      return enter(kMerges);
    }
    if (mode_ == kMerges && depth_ == mode_depth_) {
      ++depth_;
      pair_.clear();
      return true;
    }
    if (mode_ != kNormal) return bad("a list");
    ++depth_;
    return dom_.start_array(n);
  }
  bool end_array() override {
    if (mode_ == kMerges && depth_ == mode_depth_ + 1) {
      if (pair_.size() != 2) {
        fail("tokenizer: {}: merge #{} is a list of {} strings, not a pair", source_,
             raw_.merges.size(), pair_.size());
      }
      raw_.merges.emplace_back(std::move(pair_[0]), std::move(pair_[1]));
      --depth_;
      return true;
    }
    if (mode_ == kMerges) {
      mode_ = kNormal;
      --depth_;
      return true;
    }
    if (mode_ != kNormal) return bad("a list");
    --depth_;
    return dom_.end_array();
  }
  bool parse_error(std::size_t pos, const std::string& token,
                   const nlohmann::detail::exception& e) override {
    return dom_.parse_error(pos, token, e);  // throws json::parse_error
  }

 private:
  enum Mode { kNormal, kVocab, kMerges };

  // The DOM gets null in place of the streamed value, so the key stays and "model" keeps shape.
  bool enter(Mode m) {
    mode_ = m;
    ++depth_;
    mode_depth_ = depth_;
    (m == kVocab ? raw_.has_vocab : raw_.has_merges) = true;
    return dom_.null();
  }
  bool vocab_id(int64_t id) {
    if (id < 0 || id > INT32_MAX) fail("tokenizer: {}: token '{}' has id {}", source_, key_, id);
    raw_.vocab.emplace_back(std::move(key_), id);
    return true;
  }
  bool bad(const char* what) {
    fail("tokenizer: {}: unexpected {} inside model.{}", source_, what,
         mode_ == kVocab ? "vocab (expected token: id)" : "merges (expected \"a b\" or [a, b])");
  }

  nlohmann::detail::json_sax_dom_parser<json> dom_;
  RawModel& raw_;
  std::string_view source_;
  Mode mode_ = kNormal;
  int depth_ = 0;
  int mode_depth_ = 0;
  std::string root_key_, model_key_, key_;
  std::vector<std::string> pair_;
};

}  // namespace

struct Tokenizer::Impl {
  std::string source;

  // Model vocabulary and the spelling of every id (added tokens override, as in the library).
  TokenTable vocab;
  std::vector<std::string_view> id_to_token;  // views of vocab keys / added contents
  std::vector<uint8_t> id_known;
  std::vector<uint8_t> id_special;
  MergeTable merges;
  std::array<int32_t, 256> byte_id{};  // id of each single-byte token, -1 if absent
  std::optional<int32_t> unk_id;
  bool fuse_unk = false;
  bool ignore_merges = false;

  std::vector<AddedToken> added;
  StringMap<int32_t> added_ids;
  AddedMatcher raw_matcher;         // added tokens with normalized=false: on the raw text
  AddedMatcher normalized_matcher;  // normalized=true: on each normalized piece

  bool nfc = false;
  bool byte_level = false;
  std::vector<Stage> stages;

  std::vector<TemplatePart> single_template;
  std::string unsupported_post_processor;

  mutable WordCache cache;

  void load_model(const json& model, RawModel& raw);
  void load_added(const json& list);
  void load_normalizer(const json& n);
  void load_pre_tokenizer(const json& p);
  void load_post_processor(const json& p);

  void encode_into(std::string_view text, std::vector<int32_t>& out) const;
  void pre_tokenize(size_t stage, std::string_view piece, std::vector<int32_t>& out) const;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::load_model(const json& model, RawModel& raw) {
  if (!model.is_object()) fail("tokenizer: {}: \"model\" is missing or not an object", source);
  std::string type = model.contains("type") ? json_type_name(model) : "BPE";
  if (type != "BPE") {
    fail(
        "tokenizer: {}: model type '{}' is not supported (only byte-level BPE: Qwen2/Qwen3, "
        "Llama-3, GPT-2)",
        source, type);
  }
  if (auto d = model.find("dropout"); d != model.end() && !d->is_null() && d->get<double>() > 0) {
    fail("tokenizer: {}: BPE dropout is not supported (it makes encoding random)", source);
  }
  if (get_bool(model, "byte_fallback", false)) {
    fail(
        "tokenizer: {}: BPE byte_fallback is not supported (a SentencePiece-style model, not "
        "byte-level BPE)",
        source);
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && it->is_string() && !it->get<std::string>().empty()) {
      fail("tokenizer: {}: BPE {} is not supported", source, key);
    }
  }
  ignore_merges = get_bool(model, "ignore_merges", false);
  fuse_unk = get_bool(model, "fuse_unk", false);

  if (!raw.has_vocab) fail("tokenizer: {}: model.vocab is missing or not an object", source);
  if (!raw.has_merges) fail("tokenizer: {}: model.merges is missing or not a list", source);
  size_t bytes = 0;
  for (const auto& entry : raw.vocab) bytes += entry.first.size();
  vocab.reserve(raw.vocab.size(), bytes);
  int32_t max_id = -1;
  for (const auto& [token, id] : raw.vocab) {
    vocab.insert(token, static_cast<int32_t>(id));
    max_id = std::max(max_id, static_cast<int32_t>(id));
  }
  raw.vocab = {};
  id_to_token.resize(static_cast<size_t>(max_id) + 1);
  id_known.assign(id_to_token.size(), 0);
  for (size_t k = 0; k < vocab.size(); ++k) {
    id_to_token[vocab.id(k)] = vocab.view(k);
    id_known[vocab.id(k)] = 1;
  }

  if (auto u = model.find("unk_token"); u != model.end() && u->is_string()) {
    unk_id = vocab.find(u->get<std::string>());
  }
  const auto& chars = text::byte_to_char();
  for (int b = 0; b < 256; ++b) {
    std::string s;
    text::append_utf8(s, chars[b]);
    byte_id[b] = vocab.find(s).value_or(-1);
  }

  merges.reserve(raw.merges.size());
  std::string joined;
  for (size_t rank = 0; rank < raw.merges.size(); ++rank) {
    const auto& [left, right] = raw.merges[rank];
    joined.assign(left).append(right);
    const auto a = vocab.find(left), b = vocab.find(right), ab = vocab.find(joined);
    if (!a || !b || !ab) {
      fail("tokenizer: {}: merge #{} ('{}', '{}') uses a token missing from the vocabulary", source,
           rank, left, right);
    }
    merges.insert(*a, *b, {static_cast<uint32_t>(rank), *ab});
  }
  raw.merges = {};
}

void Tokenizer::Impl::load_added(const json& list) {
  if (!list.is_array()) fail("tokenizer: {}: \"added_tokens\" is not a list", source);
  for (const json& a : list) {
    AddedToken t;
    t.content = a.at("content").get<std::string>();
    const int64_t id = a.at("id").get<int64_t>();
    if (id < 0 || id > INT32_MAX) fail("tokenizer: {}: added token has id {}", source, id);
    if (text::find_invalid_utf8(t.content) != text::kValid) {
      fail("tokenizer: {}: added token {} is not valid UTF-8", source, id);
    }
    t.id = static_cast<int32_t>(id);
    t.special = get_bool(a, "special", false);
    t.lstrip = get_bool(a, "lstrip", false);
    t.rstrip = get_bool(a, "rstrip", false);
    t.single_word = get_bool(a, "single_word", false);
    t.normalized = get_bool(a, "normalized", !t.special);
    added.push_back(std::move(t));
  }
  for (const AddedToken& t : added) {
    if (static_cast<size_t>(t.id) >= id_to_token.size()) {
      id_to_token.resize(static_cast<size_t>(t.id) + 1);
      id_known.resize(id_to_token.size(), 0);
    }
    id_to_token[t.id] = t.content;
    id_known[t.id] = 1;
    added_ids[t.content] = t.id;
  }
  id_special.assign(id_to_token.size(), 0);
  for (const AddedToken& t : added) {
    if (t.special) id_special[t.id] = 1;
  }
}

void Tokenizer::Impl::load_normalizer(const json& n) {
  if (n.is_null()) return;
  const std::string type = json_type_name(n);
  if (type == "NFC") {
    nfc = true;
  } else if (type == "Sequence") {
    for (const json& child : n.at("normalizers")) load_normalizer(child);
  } else {
    fail("tokenizer: {}: normalizer type '{}' is not supported (only NFC)", source, type);
  }
}

void Tokenizer::Impl::load_pre_tokenizer(const json& p) {
  const std::string type = json_type_name(p);
  if (type == "Sequence") {
    for (const json& child : p.at("pretokenizers")) load_pre_tokenizer(child);
  } else if (type == "Split") {
    const json& pattern = p.at("pattern");
    Stage s;
    if (pattern.contains("Regex")) {
      s.regex = std::make_unique<SplitRegex>(pattern["Regex"].get<std::string>(), false, source);
    } else if (pattern.contains("String")) {
      s.regex = std::make_unique<SplitRegex>(pattern["String"].get<std::string>(), true, source);
    } else {
      fail("tokenizer: {}: Split pattern {} is neither Regex nor String", source, pattern.dump());
    }
    const std::string behavior = p.value("behavior", "Isolated");
    const bool invert = get_bool(p, "invert", false);
    if (behavior == "Removed" && !invert) {
      s.remove_matches = true;
    } else if (behavior != "Isolated") {
      // Isolated keeps matches and gaps as pieces, so invert changes nothing there.
      fail("tokenizer: {}: Split behavior '{}'{} is not supported (only Isolated)", source,
           behavior, invert ? " with invert" : "");
    }
    stages.push_back(std::move(s));
  } else if (type == "ByteLevel") {
    byte_level = true;
    Stage s;
    s.add_prefix_space = get_bool(p, "add_prefix_space", true);
    if (get_bool(p, "use_regex", true))
      s.regex = std::make_unique<SplitRegex>(kGpt2Pattern, false, source);
    stages.push_back(std::move(s));
  } else {
    fail("tokenizer: {}: pre-tokenizer type '{}' is not supported (Split and ByteLevel only)",
         source, type);
  }
}

void Tokenizer::Impl::load_post_processor(const json& p) {
  if (p.is_null()) return;
  const std::string type = json_type_name(p);
  if (type == "ByteLevel") return;  // adjusts offsets only
  if (type == "Sequence") {
    for (const json& child : p.at("processors")) load_post_processor(child);
  } else if (type == "TemplateProcessing") {
    const json& specials = p.at("special_tokens");
    for (const json& part : p.at("single")) {
      TemplatePart tp;
      if (part.contains("Sequence")) {
        tp.is_sequence = true;
      } else if (part.contains("SpecialToken")) {
        const std::string name = part["SpecialToken"].at("id").get<std::string>();
        if (!specials.contains(name)) {
          fail("tokenizer: {}: post-processor template names unknown special token '{}'", source,
               name);
        }
        tp.ids = specials[name].at("ids").get<std::vector<int32_t>>();
      } else {
        fail("tokenizer: {}: post-processor template part {} not understood", source, part.dump());
      }
      single_template.push_back(std::move(tp));
    }
  } else if (unsupported_post_processor.empty()) {
    // Only needed for add_special_tokens, so complain then rather than refuse the file.
    unsupported_post_processor = type;
  }
}

void Tokenizer::Impl::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
  };
  struct Candidate {
    uint32_t rank;
    int32_t pos;
    int32_t id;
    // std::push_heap keeps the largest on top: make that the lowest rank, then leftmost.
    bool operator<(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  thread_local std::vector<Symbol> symbols;
  thread_local std::vector<Candidate> heap;
  symbols.clear();
  heap.clear();
  for (unsigned char b : word) {
    int32_t id = byte_id[b];
    if (id < 0) {
      if (!unk_id) continue;  // the library drops unknown characters without an unk token
      if (fuse_unk && !symbols.empty() && symbols.back().id == *unk_id) continue;
      id = *unk_id;
    }
    const auto n = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, n - 1, -1});
    if (n > 0) symbols[n - 1].next = n;
  }
  if (symbols.size() > 1) {
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      if (const auto* m = merges.find(symbols[i].id, symbols[i + 1].id)) {
        heap.push_back({m->rank, static_cast<int32_t>(i), m->id});
      }
    }
    std::make_heap(heap.begin(), heap.end());
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end());
      const Candidate c = heap.back();
      heap.pop_back();
      Symbol& s = symbols[c.pos];
      if (s.id < 0 || s.next < 0) continue;
      Symbol& r = symbols[s.next];
      // Stale candidate: one side was merged into something else since it was queued.
      const auto* m = merges.find(s.id, r.id);
      if (m == nullptr || m->id != c.id) continue;
      s.id = c.id;
      r.id = -1;
      s.next = r.next;
      if (s.next >= 0) symbols[s.next].prev = c.pos;
      if (s.prev >= 0) {
        if (const auto* l = merges.find(symbols[s.prev].id, s.id)) {
          heap.push_back({l->rank, s.prev, l->id});
          std::push_heap(heap.begin(), heap.end());
        }
      }
      if (s.next >= 0) {
        if (const auto* n = merges.find(s.id, symbols[s.next].id)) {
          heap.push_back({n->rank, c.pos, n->id});
          std::push_heap(heap.begin(), heap.end());
        }
      }
    }
  }
  for (int32_t i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next)
    out.push_back(symbols[i].id);
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges) {
    // A whole word that is a token is taken as is (Llama-3), before any merge.
    std::string mapped;
    mapped.reserve(word.size() * 2);
    for (unsigned char b : word) text::append_utf8(mapped, text::byte_to_char()[b]);
    if (const auto id = vocab.find(mapped)) {
      out.push_back(*id);
      return;
    }
  }
  if (word.size() == 1) {
    merge_word(word, out);
    return;
  }
  const bool cacheable = word.size() < kCacheMaxWordBytes;
  uint64_t h = 0;
  if (cacheable) {
    h = WordCache::hash(word);
    if (cache.find(word, h, out)) return;
  }
  const size_t first = out.size();
  merge_word(word, out);
  if (cacheable) cache.insert(word, h, std::span<const int32_t>(out).subspan(first));
}

void Tokenizer::Impl::pre_tokenize(size_t stage, std::string_view piece,
                                   std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (stage == stages.size()) {
    bpe(piece, out);
    return;
  }
  const Stage& st = stages[stage];
  std::string prefixed;
  if (st.add_prefix_space && piece.front() != ' ') {
    prefixed.reserve(piece.size() + 1);
    prefixed.push_back(' ');
    prefixed.append(piece);
    piece = prefixed;
  }
  if (!st.regex) {
    pre_tokenize(stage + 1, piece, out);
    return;
  }
  std::vector<std::pair<size_t, size_t>> matches;
  st.regex->find_all(piece, matches);
  size_t done = 0;
  for (auto [b, e] : matches) {
    if (b > done) pre_tokenize(stage + 1, piece.substr(done, b - done), out);
    if (!st.remove_matches) pre_tokenize(stage + 1, piece.substr(b, e - b), out);
    done = e;
  }
  if (done < piece.size()) pre_tokenize(stage + 1, piece.substr(done), out);
}

void Tokenizer::Impl::encode_into(std::string_view input, std::vector<int32_t>& out) const {
  std::vector<Segment> raw, inner;
  raw_matcher.split(input, raw);
  for (const Segment& seg : raw) {
    if (seg.token >= 0) {
      out.push_back(seg.token);
      continue;
    }
    std::string_view piece = input.substr(seg.begin, seg.end - seg.begin);
    std::string normalized;
    if (nfc) {
      normalized = text::nfc(piece);
      piece = normalized;
    }
    if (normalized_matcher.empty()) {
      pre_tokenize(0, piece, out);
      continue;
    }
    normalized_matcher.split(piece, inner);
    for (const Segment& s : inner) {
      if (s.token >= 0) {
        out.push_back(s.token);
      } else {
        pre_tokenize(0, piece.substr(s.begin, s.end - s.begin), out);
      }
    }
  }
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::filesystem::path& path) {
  std::error_code ec;
  std::filesystem::path file = path;
  if (std::filesystem::is_directory(path, ec)) {
    file = path / "tokenizer.json";
    if (!std::filesystem::exists(file, ec)) {
      fail(
          "tokenizer: {} has no tokenizer.json (only the fast-tokenizer file is supported, not "
          "vocab.json + merges.txt)",
          path.string());
    }
  } else if (!std::filesystem::exists(path, ec)) {
    fail("tokenizer: {} does not exist", path.string());
  }
  return from_json(read_file(file), file.string());
}

Tokenizer Tokenizer::from_json(std::string_view json_text, std::string_view source) {
  auto impl = std::make_unique<Impl>();
  impl->source = std::string(source);
  json doc;
  RawModel raw;
  try {
    TokenizerJsonSax sax(doc, raw, impl->source);
    json::sax_parse(json_text.begin(), json_text.end(), &sax);
  } catch (const json::exception& e) {  // the DOM builder rethrows parse errors sliced
    fail("tokenizer: {} is not valid JSON ({}). Perhaps an incomplete download or corrupt file?",
         source, e.what());
  }
  if (!doc.is_object()) fail("tokenizer: {}: expected a JSON object at the top level", source);
  try {
    impl->load_model(doc.contains("model") ? doc["model"] : json(), raw);
    const json added = doc.value("added_tokens", json::array());
    impl->load_added(added.is_null() ? json::array() : added);
    impl->load_normalizer(doc.value("normalizer", json()));
    const json pre = doc.value("pre_tokenizer", json());
    if (pre.is_null())
      fail("tokenizer: {}: no pre_tokenizer; byte-level BPE needs ByteLevel", source);
    impl->load_pre_tokenizer(pre);
    if (!impl->byte_level) {
      fail(
          "tokenizer: {}: the pre-tokenizer has no ByteLevel step; only byte-level BPE is "
          "supported",
          source);
    }
    const json dec = doc.value("decoder", json());
    if (!dec.is_null() && json_type_name(dec) != "ByteLevel") {
      fail("tokenizer: {}: decoder type '{}' is not supported (only ByteLevel)", source,
           json_type_name(dec));
    }
    impl->load_post_processor(doc.value("post_processor", json()));
  } catch (const json::exception& e) {
    fail("tokenizer: {}: unexpected tokenizer.json structure: {}", source, e.what());
  }
  for (const AddedToken& t : impl->added) {
    if (t.normalized) {
      impl->normalized_matcher.add(impl->nfc ? text::nfc(t.content) : t.content, &t);
    } else {
      impl->raw_matcher.add(t.content, &t);
    }
  }
  impl->raw_matcher.finish();
  impl->normalized_matcher.finish();
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  if (const size_t bad = text::find_invalid_utf8(text); bad != text::kValid) {
    fail(
        "tokenize: the text is not valid UTF-8 (byte 0x{:02X} at offset {}); decode it first, "
        "e.g. replacing bad bytes with U+FFFD",
        static_cast<unsigned char>(text[bad]), bad);
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (!add_special_tokens || impl_->single_template.empty()) {
    if (add_special_tokens && !impl_->unsupported_post_processor.empty()) {
      fail(
          "tokenize: {}: post-processor type '{}' is not supported; encode without special "
          "tokens",
          impl_->source, impl_->unsupported_post_processor);
    }
    impl_->encode_into(text, ids);
    return ids;
  }
  for (const TemplatePart& part : impl_->single_template) {
    if (part.is_sequence) {
      impl_->encode_into(text, ids);
    } else {
      ids.insert(ids.end(), part.ids.begin(), part.ids.end());
    }
  }
  return ids;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(std::span<const std::string> texts,
                                                          unsigned threads) const {
  std::vector<std::vector<int32_t>> out(texts.size());
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  threads = static_cast<unsigned>(std::min<size_t>(threads, texts.size()));
  if (threads <= 1) {
    for (size_t i = 0; i < texts.size(); ++i) out[i] = encode(texts[i]);
    return out;
  }
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < texts.size();) {
        try {
          out[i] = encode(texts[i]);
        } catch (...) {
          std::lock_guard lock(error_mutex);
          if (!error) error = std::current_exception();
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= impl_->id_to_token.size() || !impl_->id_known[id]) {
      fail("decode: id {} names no token (vocabulary size {})", id, impl_->id_to_token.size());
    }
    if (skip_special_tokens && impl_->id_special[id]) continue;
    const std::string_view token = impl_->id_to_token[id];
    // Each character maps back to one byte; a token with any character outside the byte table
    // (an added token such as "<|im_start|>" is fine, its characters are printable ASCII)
    // contributes its own UTF-8 bytes, as the library's ByteLevel decoder does.
    const size_t mark = bytes.size();
    bool mapped = true;
    for (size_t i = 0; i < token.size();) {
      const int b = text::char_to_byte(text::next_code_point(token, i));
      if (b < 0) {
        mapped = false;
        break;
      }
      bytes.push_back(static_cast<char>(b));
    }
    if (!mapped) {
      bytes.resize(mark);
      bytes.append(token);
    }
  }
  return text::utf8_lossy(bytes);
}

size_t Tokenizer::vocab_size() const {
  return impl_->id_to_token.size();
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (auto it = impl_->added_ids.find(token); it != impl_->added_ids.end()) return it->second;
  return impl_->vocab.find(token);
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= impl_->id_to_token.size() || !impl_->id_known[id]) {
    return std::nullopt;
  }
  return std::string(impl_->id_to_token[id]);
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_special.size() && impl_->id_special[id];
}

}  // namespace nanscope
