#include "cli/inputs.hpp"

#include <charconv>
#include <filesystem>

#include "common/error.hpp"
#include "tokenizer/bpe.hpp"

namespace nanscope::cli {

std::vector<int64_t> parse_ids(const std::string& s) {
  std::vector<int64_t> ids;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ' ' || s[i] == ',' || s[i] == '[' || s[i] == ']')) ++i;
    if (i >= s.size()) break;
    int64_t v = 0;
    auto [p, ec] = std::from_chars(s.data() + i, s.data() + s.size(), v);
    if (ec != std::errc() || v < 0)
      fail("--ids: \"{}\" is not a comma-separated list of non-negative token ids (at \"{}\")", s,
           s.substr(i, 12));
    ids.push_back(v);
    i = size_t(p - s.data());
  }
  if (ids.empty()) fail("--ids: no token ids in \"{}\"", s);
  return ids;
}

std::vector<int64_t> resolve_tokens(const std::string& model_dir, const std::string& ids,
                                    const std::string& text, const std::string& tokenizer,
                                    const std::string& fallback_text) {
  if (!ids.empty() && !text.empty()) fail("pass either --ids or --text, not both");
  if (!ids.empty()) return parse_ids(ids);
  std::string t = text.empty() ? fallback_text : text;
  if (t.empty()) fail("pass the input as --ids 1,2,3 or --text \"...\"");
  std::filesystem::path tok = tokenizer.empty()
                                  ? std::filesystem::path(model_dir) / "tokenizer.json"
                                  : std::filesystem::path(tokenizer);
  if (!std::filesystem::exists(tok))
    fail("{}: no tokenizer.json to turn --text into ids; pass --tokenizer FILE or --ids",
         tokenizer.empty() ? model_dir : tokenizer);
  Tokenizer tk = Tokenizer::load(tok);
  std::vector<int64_t> out;
  for (int32_t id : tk.encode(t)) out.push_back(id);
  if (out.empty()) fail("--text \"{}\" gives no tokens", t);
  return out;
}

}  // namespace nanscope::cli
