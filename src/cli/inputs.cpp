#include "cli/inputs.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <filesystem>

#include "common/error.hpp"
#include "common/strings.hpp"
#include "formats/checkpoint.hpp"
#include "formats/hub.hpp"
#include "tokenizer/bpe.hpp"

namespace nanscope::cli {

std::string model_path(const std::string& arg) {
  const std::string p = resolve_model_path(arg).string();
  if (p != arg) fmt::print(stderr, "nanscope: {} is {}\n", arg, p);
  return p;
}

std::vector<std::string> split_list(const std::string& flag, const std::string& s) {
  std::vector<std::string> items;
  size_t b = 0;
  for (;;) {
    const size_t e = std::min(s.find(',', b), s.size());
    std::string item = s.substr(b, e - b);
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    if (item.empty())
      fail_usage("{} \"{}\": empty item {} (a list is written like a,b,c)", flag, s,
                 items.size() + 1);
    items.push_back(item);
    if (e == s.size()) break;
    b = e + 1;
  }
  return items;
}

std::vector<int64_t> parse_ids(const std::string& s0) {
  std::string s = s0;
  s.erase(0, s.find_first_not_of(' '));
  s.erase(s.find_last_not_of(' ') + 1);
  if (s.size() >= 2 && s.front() == '[' && s.back() == ']') s = s.substr(1, s.size() - 2);
  std::vector<int64_t> ids;
  for (const std::string& item : split_list("--ids", s)) {
    int64_t v = 0;
    auto [p, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (ec != std::errc() || p != item.data() + item.size() || v < 0)
      fail_usage(
          "--ids \"{}\": \"{}\" is not a token id (expected non-negative integers separated by "
          "commas, like 1,2,3)",
          s0, item);
    ids.push_back(v);
  }
  return ids;
}

std::vector<int64_t> resolve_tokens(const std::string& model_dir, const std::string& ids,
                                    const std::string& text, const std::string& tokenizer) {
  if (!ids.empty() && !text.empty()) fail_usage("pass either --ids or --text, not both");
  if (!ids.empty()) return parse_ids(ids);
  if (text.empty()) fail_usage("pass the input as --ids 1,2,3 or --text \"...\"");
  std::filesystem::path tok = tokenizer.empty()
                                  ? std::filesystem::path(model_dir) / "tokenizer.json"
                                  : std::filesystem::path(tokenizer);
  if (!std::filesystem::exists(tok))
    fail("{}: no tokenizer.json to turn --text into ids; pass --tokenizer FILE or --ids",
         tokenizer.empty() ? model_dir : tokenizer);
  Tokenizer tk = Tokenizer::load(tok);
  std::vector<int64_t> out;
  for (int32_t id : tk.encode(text)) out.push_back(id);
  if (out.empty()) fail_usage("--text \"{}\" gives no tokens", text);
  return out;
}

AttentionProfile parse_attention_flag(const std::string& s, const std::string& more) {
  if (const auto a = parse_attention(s)) return *a;
  fail_usage("--attention {}: expected eager, or fused (also spelled sdpa){}", s, more);
}

DType parse_run_dtype_flag(const std::string& flag, const std::string& s,
                           const std::string& model_dir) {
  if (const auto t = parse_float_dtype(s)) return *t;
  if (ascii_lower(s) == "auto" && !model_dir.empty()) {
    const Checkpoint ck = Checkpoint::open(model_dir);
    const DType t = ck.config().dtype.value_or(ck.storage_dtype());
    if (!is_float_computable(t))
      fail("{}: {} auto: the checkpoint's dtype {} is not fp32, bf16 or fp16; pass one", model_dir,
           flag, dtype_name(t));
    return t;
  }
  fail_usage("{} {}: expected {}{}", flag, s, float_dtype_spellings(),
             model_dir.empty() ? "" : ", or auto (the checkpoint's dtype)");
}

}  // namespace nanscope::cli
