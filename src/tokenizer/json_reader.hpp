// Reads tokenizer.json in one pass: model.vocab and model.merges (~150k entries each) go straight
// into flat vectors, everything else into a JSON DOM.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace nanscope::bpe_internal {

struct RawModel {
  bool has_vocab = false;
  bool has_merges = false;
  std::vector<std::pair<std::string, int64_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merges;
};

// Throws nlohmann::json::exception for malformed JSON, InputError (naming `source`) for a
// vocab or merges entry of the wrong shape.
void read_tokenizer_json(std::string_view text, std::string_view source, nlohmann::json& doc,
                         RawModel& raw);

}  // namespace nanscope::bpe_internal
