#include "tokenizer/json_reader.hpp"

#include "common/error.hpp"
#include "common/json_depth.hpp"

namespace nanscope::bpe_internal {
namespace {

using json = nlohmann::json;

// Building model.vocab and model.merges as a DOM (a std::map per object, a heap string per
// value) costs most of the load time, so this handler streams them and builds the rest.
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
    if (depth_ >= kMaxJsonDepth) too_deep();
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
    if (depth_ >= kMaxJsonDepth) too_deep();
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
  [[noreturn]] void too_deep() const {
    fail("tokenizer: {} is not valid JSON (nests deeper than {} levels)", source_, kMaxJsonDepth);
  }
  bool bad(const char* what) {
    fail("tokenizer: {}: found {} inside model.{}", source_, what,
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

void read_tokenizer_json(std::string_view text, std::string_view source, json& doc, RawModel& raw) {
  TokenizerJsonSax sax(doc, raw, source);
  json::sax_parse(text.begin(), text.end(), &sax);
}

}  // namespace nanscope::bpe_internal
