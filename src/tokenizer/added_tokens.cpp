#include "tokenizer/added_tokens.hpp"

#include <algorithm>

#include "tokenizer/text.hpp"

namespace nanscope::bpe_internal {
namespace {

size_t previous_boundary(std::string_view s, size_t i) {
  do {
    --i;
  } while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80);
  return i;
}
bool word_boundary_before(std::string_view s, size_t start) {
  if (start == 0) return true;
  size_t i = previous_boundary(s, start);
  return !text::is_word_char(text::next_code_point(s, i));
}
bool word_boundary_after(std::string_view s, size_t stop) {
  if (stop == s.size()) return true;
  size_t i = stop;
  return !text::is_word_char(text::next_code_point(s, i));
}
size_t whitespace_run_start(std::string_view s, size_t start) {
  while (start > 0) {
    size_t i = previous_boundary(s, start);
    size_t j = i;
    if (!text::is_white_space(text::next_code_point(s, j))) break;
    start = i;
  }
  return start;
}
size_t whitespace_run_end(std::string_view s, size_t stop) {
  while (stop < s.size()) {
    size_t j = stop;
    if (!text::is_white_space(text::next_code_point(s, j))) break;
    stop = j;
  }
  return stop;
}

}  // namespace

void AddedMatcher::finish() {
  // Longest first so the first hit at a position is the longest one.
  std::stable_sort(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) {
    return a.pattern.size() > b.pattern.size();
  });
  for (size_t i = 0; i < entries_.size(); ++i) {
    by_first_byte_[static_cast<unsigned char>(entries_[i].pattern[0])].push_back(i);
  }
}

void AddedMatcher::split(std::string_view s, std::vector<Segment>& out) const {
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

}  // namespace nanscope::bpe_internal
