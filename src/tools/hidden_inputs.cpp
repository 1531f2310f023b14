// The input lines of `nanscope hidden` (docs/hidden.md): one JSON object per line, checked
// whole before anything is computed. Apart from the forward pass so that the fuzz target
// (fuzz/fuzz_hidden_jsonl.cpp) links only this and the tokenizer.
#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <fstream>
#include <optional>
#include <sstream>
#include <unordered_map>

#include "common/error.hpp"
#include "common/json_depth.hpp"
#include "tokenizer/bpe.hpp"
#include "tools/hidden.hpp"

namespace nanscope {

namespace fs = std::filesystem;
using nlohmann::json;

std::string_view HiddenInput::kind() const {
  if (soft.empty()) return "ids";
  return ids.empty() ? "soft" : "mixed";
}

// ---- input lines ----

void validate_input(const HiddenInput& in, const InputRules& rules, std::string_view where) {
  const int64_t T = in.tokens();
  if (T == 0) fail("{}: input \"{}\" has no tokens", where, in.id);
  const int64_t V = rules.vocab_size;
  for (size_t t = 0; t < in.ids.size(); ++t)
    if (in.ids[t] < 0 || in.ids[t] >= V)
      fail("{}: input \"{}\": token id {} at position {} is out of range (vocab_size {})", where,
           in.id, in.ids[t], t, V);
  for (const auto& [pos, mix] : in.soft) {
    if (pos < 0 || pos >= T)
      fail("{}: input \"{}\": soft position {} is outside the {} positions", where, in.id, pos, T);
    if (mix.empty()) fail("{}: input \"{}\": soft position {} has no tokens", where, in.id, pos);
    double sum = 0;
    for (const auto& [tok, p] : mix) {
      if (tok < 0 || tok >= V)
        fail("{}: input \"{}\": soft position {}: token id {} is out of range (vocab_size {})",
             where, in.id, pos, tok, V);
      if (!std::isfinite(p) || p < 0)
        fail(
            "{}: input \"{}\": soft position {}: probability {} of token {} is not a finite "
            "non-negative number",
            where, in.id, pos, p, tok);
      sum += p;
    }
    if (!rules.allow_unnormalized && std::fabs(sum - 1.0) > rules.sum_tolerance)
      fail(
          "{}: input \"{}\": soft position {}: probabilities sum to {:.6g}, not 1 (tolerance {}); "
          "renormalize them, or pass --allow-unnormalized to use the weights as given",
          where, in.id, pos, sum, rules.sum_tolerance);
  }
}

namespace {

int64_t json_int(const json& v, std::string_view where, std::string_view what) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > uint64_t(INT64_MAX)) fail("{}: {} {} is too large", where, what, u);
    return int64_t(u);
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  fail("{}: {} must be an integer, found {}", where, what, v.dump());
}

Mixture json_mixture(const json& v, std::string_view where, std::string_view pos) {
  if (!v.is_array())
    fail("{}: soft position {} must be a list of [token, prob] pairs, found {}", where, pos,
         v.dump().substr(0, 60));
  Mixture m;
  for (const auto& pair : v) {
    if (!pair.is_array() || pair.size() != 2 || !pair[1].is_number())
      fail("{}: soft position {}: expected a [token, prob] pair, found {}", where, pos,
           pair.dump().substr(0, 60));
    const int64_t tok = json_int(pair[0], where, fmt::format("soft position {}: token", pos));
    // Probabilities are float32 as the torch side holds them; the JSON decimal of a float32
    // converts back to that float exactly.
    m.emplace_back(tok, float(pair[1].get<double>()));
  }
  return m;
}

}  // namespace

HiddenInput parse_hidden_input(const json& j, const TokenizeFn& tokenize, std::string_view where) {
  if (!j.is_object()) fail("{}: expected a JSON object per line", where);
  HiddenInput in;
  const auto id = j.find("id");
  if (id == j.end()) fail("{}: the line has no \"id\"", where);
  if (id->is_string())
    in.id = id->get<std::string>();
  else if (id->is_number_integer() || id->is_number_unsigned())
    in.id = id->dump();
  else
    fail("{}: \"id\" must be a string or an integer, found {}", where, id->dump());
  if (in.id.empty()) fail("{}: \"id\" is empty", where);

  const bool has_ids = j.contains("ids"), has_text = j.contains("text"),
             has_soft = j.contains("soft");
  if (has_ids && has_text) fail("{}: input \"{}\" has both \"ids\" and \"text\"", where, in.id);
  if (!has_ids && !has_text && !has_soft)
    fail("{}: input \"{}\" has none of \"ids\", \"text\", \"soft\"", where, in.id);
  if (has_ids) {
    const json& v = j["ids"];
    if (!v.is_array()) fail("{}: input \"{}\": \"ids\" must be a list of token ids", where, in.id);
    for (const auto& x : v) in.ids.push_back(json_int(x, where, "token id"));
  }
  if (has_text) {
    const json& v = j["text"];
    if (!v.is_string()) fail("{}: input \"{}\": \"text\" must be a string", where, in.id);
    if (!tokenize) fail("{}: input \"{}\" is text, and there is no tokenizer", where, in.id);
    try {
      in.ids = tokenize(v.get<std::string>());
    } catch (const InputError& e) {
      fail("{}: input \"{}\": {}", where, in.id, e.what());
    }
    if (in.ids.empty()) fail("{}: input \"{}\": the text gives no tokens", where, in.id);
  }
  if (has_soft) {
    const json& v = j["soft"];
    if (has_ids || has_text) {
      // Mixed: {"<position>": [[token, prob], ...]} replacing positions of the ids.
      if (!v.is_object())
        fail(
            "{}: input \"{}\": with \"ids\" or \"text\", \"soft\" must map positions to "
            "mixtures, e.g. {{\"3\": [[17, 0.6], [42, 0.4]]}}",
            where, in.id);
      for (const auto& [key, mix] : v.items()) {
        int64_t pos = -1;
        auto [p, ec] = std::from_chars(key.data(), key.data() + key.size(), pos);
        if (ec != std::errc() || p != key.data() + key.size() || pos < 0)
          fail("{}: input \"{}\": soft position \"{}\" is not a non-negative integer", where, in.id,
               key);
        in.soft[pos] = json_mixture(mix, where, key);
      }
      if (in.soft.empty()) fail("{}: input \"{}\": \"soft\" is empty", where, in.id);
    } else {
      if (!v.is_array() || v.empty())
        fail(
            "{}: input \"{}\": \"soft\" must be a non-empty list (one list of [token, prob] "
            "pairs per position)",
            where, in.id);
      for (size_t t = 0; t < v.size(); ++t)
        in.soft[int64_t(t)] = json_mixture(v[t], where, std::to_string(t));
    }
  }
  return in;
}

std::vector<HiddenInput> parse_hidden_jsonl(std::string_view text, std::string_view what,
                                            const TokenizeFn& tokenize, const InputRules& rules) {
  std::vector<HiddenInput> out;
  std::unordered_map<std::string, int64_t> seen;
  int64_t n = 0;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t eol = text.find('\n', begin);
    if (eol == std::string_view::npos) eol = text.size();
    const std::string_view line = text.substr(begin, eol - begin);
    begin = eol + 1;
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string where = fmt::format("{}:{}", what, n);
    json j;
    try {
      j = json::parse(line, json_depth_limit<json>(where));
    } catch (const json::exception& e) {  // parse_error, or out_of_range for 1e400
      fail("{}: invalid JSON: {}", where, e.what());
    }
    HiddenInput in = parse_hidden_input(j, tokenize, where);
    in.line = n;
    validate_input(in, rules, where);
    auto [it, fresh] = seen.emplace(in.id, n);
    if (!fresh) fail("{}: id \"{}\" already given on line {}", where, in.id, it->second);
    out.push_back(std::move(in));
  }
  return out;
}

std::vector<HiddenInput> read_hidden_inputs(const fs::path& jsonl, const fs::path& tokenizer,
                                            const InputRules& rules) {
  std::ifstream f(jsonl, std::ios::binary);
  if (!f) fail("{}: cannot open the input file", jsonl.string());
  std::stringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail("{}: read error", jsonl.string());
  std::optional<Tokenizer> tk;
  auto tokenize = [&](const std::string& text) {
    if (!tk) {
      fs::path p = tokenizer;
      if (fs::is_directory(p)) p /= "tokenizer.json";
      if (!fs::exists(p))
        fail(
            "{}: no tokenizer.json to tokenize \"text\" inputs; pass --tokenizer FILE or give "
            "\"ids\"",
            p.string());
      tk = Tokenizer::load(p);
    }
    std::vector<int64_t> ids;
    for (int32_t i : tk->encode(text)) ids.push_back(i);
    return ids;
  };
  return parse_hidden_jsonl(ss.str(), jsonl.string(), tokenize, rules);
}

}  // namespace nanscope
