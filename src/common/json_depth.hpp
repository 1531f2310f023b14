// JSON of user files (config.json, adapter_config.json, tokenizer.json, the hidden jsonl and
// index) is parsed with a nesting limit. nlohmann_json parses any depth, but printing a value
// (error messages do) recurses: a config.json of a million nested lists overflowed the stack
// (SIGSEGV) in scan, tokenize, merge and hidden. Real files nest a few levels; serde_json, the
// safetensors reference, stops at 128 (as formats/safetensors.cpp does).
#pragma once

#include <string>
#include <utility>

#include "common/error.hpp"

namespace nanscope {

inline constexpr int kMaxJsonDepth = 128;

// The message for a document nested deeper than kMaxJsonDepth; `what` names the file.
[[noreturn]] inline void fail_json_too_deep(std::string_view what) {
  fail("{}: not valid JSON (nests deeper than {} levels)", what, kMaxJsonDepth);
}

// A parser callback for Json::parse(text, callback) that throws that InputError.
template <class Json>
typename Json::parser_callback_t json_depth_limit(std::string what) {
  return [what = std::move(what)](int depth, typename Json::parse_event_t ev, Json&) {
    if (depth >= kMaxJsonDepth &&
        (ev == Json::parse_event_t::object_start || ev == Json::parse_event_t::array_start))
      fail_json_too_deep(what);
    return true;
  };
}

}  // namespace nanscope
