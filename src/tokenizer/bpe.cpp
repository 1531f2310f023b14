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
#include "tokenizer/added_tokens.hpp"
#include "tokenizer/json_reader.hpp"
#include "tokenizer/regex.hpp"
#include "tokenizer/tables.hpp"
#include "tokenizer/text.hpp"

namespace nanscope {
namespace {

using bpe_internal::AddedMatcher;
using bpe_internal::AddedToken;
using bpe_internal::MergeTable;
using bpe_internal::RawModel;
using bpe_internal::Segment;
using bpe_internal::TokenTable;
using bpe_internal::WordCache;

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
    read_tokenizer_json(json_text, impl->source, doc, raw);
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
