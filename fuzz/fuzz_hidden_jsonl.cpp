// libFuzzer target: the input file of `nanscope hidden` (one JSON object per line), with a tiny
// byte-level tokenizer for "text" lines. The only expected failure is InputError; anything
// else is a bug.
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.hpp"
#include "tokenizer/bpe.hpp"
#include "tokenizer/text.hpp"
#include "tools/hidden.hpp"

namespace {

const nanscope::Tokenizer& tiny_tokenizer() {
  static const nanscope::Tokenizer t = [] {
    nlohmann::json vocab = nlohmann::json::object();
    for (int b = 0; b < 256; ++b) {
      std::string s;
      nanscope::text::append_utf8(s, nanscope::text::byte_to_char()[b]);
      vocab[s] = b;
    }
    vocab["ab"] = 256;
    const nlohmann::json j = {
        {"pre_tokenizer",
         {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
        {"decoder", {{"type", "ByteLevel"}}},
        {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"a b"}}}}};
    return nanscope::Tokenizer::from_json(j.dump(), "tiny");
  }();
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  // The first byte picks the rules, so both the strict and the --allow-unnormalized paths run.
  nanscope::InputRules rules;
  rules.vocab_size = 1024;
  rules.allow_unnormalized = size > 0 && (data[0] & 1);
  auto tokenize = [](const std::string& s) {
    std::vector<int64_t> ids;
    for (int32_t i : tiny_tokenizer().encode(s)) ids.push_back(i);
    return ids;
  };
  try {
    const std::vector<nanscope::HiddenInput> inputs =
        nanscope::parse_hidden_jsonl(text, "inputs.jsonl", tokenize, rules);
    for (const auto& in : inputs) {
      // Accepted: the invariants the forward pass relies on must hold.
      if (in.tokens() <= 0) std::abort();
      for (int64_t id : in.ids)
        if (id < 0 || id >= rules.vocab_size) std::abort();
      for (const auto& [pos, mix] : in.soft)
        if (pos < 0 || pos >= in.tokens() || mix.empty()) std::abort();
    }
  } catch (const nanscope::InputError&) {
  }
  return 0;
}
