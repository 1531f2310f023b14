// The PEFT key grammar of peft_names.hpp, on the key's dot-separated segments.
#include "formats/peft_names.hpp"

#include <array>
#include <vector>

namespace nanscope {

namespace {

std::vector<std::string_view> split_dots(std::string_view s) {
  std::vector<std::string_view> out;
  size_t b = 0;
  for (;;) {
    const size_t e = s.find('.', b);
    out.push_back(s.substr(b, e == std::string_view::npos ? std::string_view::npos : e - b));
    if (e == std::string_view::npos) return out;
    b = e + 1;
  }
}

std::string join_dots(const std::vector<std::string_view>& v, size_t b, size_t e) {
  std::string s;
  for (size_t i = b; i < e; ++i) {
    if (i > b) s += '.';
    s += v[i];
  }
  return s;
}

}  // namespace

std::string_view peft_role_name(PeftRole r) {
  switch (r) {
    case PeftRole::LoraA:
      return "lora_A";
    case PeftRole::LoraB:
      return "lora_B";
    case PeftRole::LoraBias:
      return "lora_B.bias";
    case PeftRole::EmbeddingA:
      return "lora_embedding_A";
    case PeftRole::EmbeddingB:
      return "lora_embedding_B";
    case PeftRole::Magnitude:
      return "lora_magnitude_vector";
    case PeftRole::TokenRows:
      return "trainable_tokens_delta";
    case PeftRole::Saved:
      return "saved";
  }
  return "?";
}

std::optional<PeftName> parse_peft_name(std::string_view key) {
  PeftName n;
  std::string_view rest = key;
  if (rest.substr(0, kPeftPrefix.size()) == kPeftPrefix) {
    n.prefixed = true;
    rest.remove_prefix(kPeftPrefix.size());
  }
  const std::vector<std::string_view> seg = split_dots(rest);

  // A role: the first `lora_*` segment (or token_adapter.trainable_tokens_delta) after at least
  // one module segment; what follows it is an optional adapter name and the parameter.
  for (size_t i = 0; i < seg.size(); ++i) {
    const std::string_view s = seg[i];
    const bool tokens =
        s == "token_adapter" && i + 1 < seg.size() && seg[i + 1] == "trainable_tokens_delta";
    if (!tokens && s.substr(0, 5) != "lora_") continue;
    if (i == 0) return std::nullopt;  // no module in front of it
    n.module = join_dots(seg, 0, i);
    const std::vector<std::string_view> tail(seg.begin() + long(i) + (tokens ? 2 : 1), seg.end());
    // tail = [ADAPTER] + what the role needs after it.
    auto fits = [&](std::initializer_list<std::string_view> after) {
      const size_t k = after.size();
      if (tail.size() != k && tail.size() != k + 1) return false;
      const size_t off = tail.size() - k;
      size_t j = off;
      for (std::string_view a : after)
        if (tail[j++] != a) return false;
      if (off) n.adapter = std::string(tail[0]);
      return true;
    };
    n.target = n.module + ".weight";
    if (tokens) {
      if (!fits({})) return std::nullopt;
      n.role = PeftRole::TokenRows;
    } else if (s == "lora_A") {
      if (!fits({"weight"})) return std::nullopt;
      n.role = PeftRole::LoraA;
    } else if (s == "lora_B") {
      if (fits({"weight"})) {
        n.role = PeftRole::LoraB;
      } else if (fits({"bias"})) {
        n.role = PeftRole::LoraBias;
        n.target = n.module + ".bias";
      } else {
        return std::nullopt;
      }
    } else if (s == "lora_embedding_A" || s == "lora_embedding_B") {
      if (!fits({})) return std::nullopt;
      n.role = s == "lora_embedding_A" ? PeftRole::EmbeddingA : PeftRole::EmbeddingB;
    } else if (s == "lora_magnitude_vector") {
      // Saved without a parameter name; in memory `lora_magnitude_vector.ADAPTER.weight`.
      if (tail.size() == 2 && tail[1] == "weight") {
        n.adapter = std::string(tail[0]);
      } else if (!fits({})) {
        return std::nullopt;
      }
      n.role = PeftRole::Magnitude;
    } else {
      return std::nullopt;  // lora_dropout, lora_C, ...: not a tensor of a known form
    }
    return n;
  }

  // A whole tensor: the wrapper infixes removed. After modules_to_save, peft's in-memory keys
  // carry the adapter name; only peft's default one ("default") is recognised, as any other is
  // indistinguishable from a submodule's name.
  std::vector<std::string_view> kept;
  for (size_t i = 0; i < seg.size(); ++i) {
    const bool inner = i > 0 && i + 1 < seg.size();  // an infix, not the first or last segment
    if (inner && (seg[i] == "base_layer" || seg[i] == "original_module")) {
      n.wrapped = true;
      continue;
    }
    if (inner && seg[i] == "modules_to_save") {
      n.wrapped = true;
      if (i + 2 < seg.size() && seg[i + 1] == "default") {
        n.adapter = "default";
        ++i;
      }
      continue;
    }
    kept.push_back(seg[i]);
  }
  n.role = PeftRole::Saved;
  n.target = join_dots(kept, 0, kept.size());
  n.module = join_dots(kept, 0, kept.size() > 1 ? kept.size() - 1 : kept.size());
  return n;
}

bool is_peft_key(std::string_view key) {
  const std::optional<PeftName> n = parse_peft_name(key);
  return !n || n->prefixed || n->is_lora() || n->wrapped;
}

}  // namespace nanscope
