// Token inputs shared by trace and check: --ids 1,2,3 or --text STR (tokenized with the model's
// tokenizer.json, or --tokenizer FILE).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nanscope::cli {

std::vector<int64_t> parse_ids(const std::string& s);  // "1,2, 3" -> {1,2,3}; InputError if bad

// Exactly one of ids / text may be set; with neither, `fallback` is used (check's default
// prompt) or an InputError says what to pass.
std::vector<int64_t> resolve_tokens(const std::string& model_dir, const std::string& ids,
                                    const std::string& text, const std::string& tokenizer,
                                    const std::string& fallback_text = "");

}  // namespace nanscope::cli
