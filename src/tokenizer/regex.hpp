// The pre-tokenizer's split regex: PCRE2 (UTF + UCP + JIT) made to agree with the Oniguruma
// engine that Hugging Face tokenizers uses for tokenizer.json patterns.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace nanscope {

class SplitRegex {
 public:
  // pattern: a tokenizer.json {"Regex": ...} pattern, or a literal when `literal` is set
  // ({"String": ...}). Throws InputError (naming `source` and PCRE2's message) if it does not
  // compile.
  SplitRegex(const std::string& pattern, bool literal, std::string_view source);
  ~SplitRegex();
  SplitRegex(SplitRegex&&) noexcept;
  SplitRegex& operator=(SplitRegex&&) noexcept;

  // Appends [begin, end) of each non-empty, non-overlapping match in subject (valid UTF-8), left
  // to right, as Oniguruma's find-iter does. `out` is cleared first.
  void find_all(std::string_view subject, std::vector<std::pair<size_t, size_t>>& out) const;

  // Rewrites a pattern so that PCRE2 matches what Oniguruma (the library's engine) matches:
  // `\s` / `\S` become explicit White_Space classes (PCRE2's UCP `\s` also takes U+180E), and
  // `\p{L}` / `\p{N}` gain the code points of Unicode versions newer than PCRE2's tables
  // (unicode_tables.hpp). Exposed for the tests.
  static std::string onig_compatible(std::string_view pattern);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nanscope
