// Added tokens (<|im_start|>, <think>, ...): found in text before the BPE runs, never split.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace nanscope::bpe_internal {

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
  // `token` must outlive the matcher.
  void add(std::string pattern, const AddedToken* token) {
    if (pattern.empty()) return;
    entries_.push_back({std::move(pattern), token});
  }
  // Call once after the last add().
  void finish();
  bool empty() const { return entries_.empty(); }

  // Cuts s into text segments and added-token segments, covering all of s.
  void split(std::string_view s, std::vector<Segment>& out) const;

 private:
  struct Entry {
    std::string pattern;
    const AddedToken* token;
  };

  std::vector<Entry> entries_;
  std::array<std::vector<size_t>, 256> by_first_byte_;
};

}  // namespace nanscope::bpe_internal
