#include "model/arch.hpp"

#include <fmt/format.h>

#include <array>

#include "common/error.hpp"

namespace nanscope {

namespace {
// Adding a Llama-family architecture costs one line here.
constexpr std::array kArchitectures = {
    //          model_type  qk_norm qkv_bias_always attention_bias mlp_bias
    Architecture{"qwen3", true, false, true, false},
    Architecture{"qwen2", false, true, false, false},
    Architecture{"llama", false, false, true, true},
};
}  // namespace

const Architecture& find_architecture(std::string_view model_type) {
  for (const auto& a : kArchitectures)
    if (a.model_type == model_type) return a;
  fail("model_type \"{}\" is not supported (supported: {})", model_type,
       fmt::join(supported_architectures(), ", "));
}

std::vector<std::string_view> supported_architectures() {
  std::vector<std::string_view> v;
  for (const auto& a : kArchitectures) v.push_back(a.model_type);
  return v;
}

LayerNames layer_names(int64_t layer) {
  LayerNames n;
  n.prefix = fmt::format("model.layers.{}.", layer);
  const auto& p = n.prefix;
  n.input_layernorm = p + "input_layernorm";
  n.q_proj = p + "self_attn.q_proj";
  n.k_proj = p + "self_attn.k_proj";
  n.v_proj = p + "self_attn.v_proj";
  n.o_proj = p + "self_attn.o_proj";
  n.q_norm = p + "self_attn.q_norm";
  n.k_norm = p + "self_attn.k_norm";
  n.post_attention_layernorm = p + "post_attention_layernorm";
  n.gate_proj = p + "mlp.gate_proj";
  n.up_proj = p + "mlp.up_proj";
  n.down_proj = p + "mlp.down_proj";
  return n;
}

std::vector<ExpectedTensor> expected_tensors(const ModelConfig& c) {
  const Architecture& a = find_architecture(c.model_type);
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const int64_t q_out = c.num_attention_heads * D, kv_out = c.num_key_value_heads * D;
  const bool attn_bias = a.attention_bias_from_config && c.attention_bias;
  const bool qkv_bias = a.qkv_bias_always || attn_bias;
  const bool mlp_bias = a.mlp_bias_from_config && c.mlp_bias;

  std::vector<ExpectedTensor> t;
  t.push_back({"model.embed_tokens.weight", {c.vocab_size, H}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerNames n = layer_names(l);
    auto add = [&](const std::string& module, const char* param, std::vector<int64_t> shape) {
      t.push_back({module + "." + param, std::move(shape)});
    };
    add(n.input_layernorm, "weight", {H});
    add(n.q_proj, "weight", {q_out, H});
    add(n.k_proj, "weight", {kv_out, H});
    add(n.v_proj, "weight", {kv_out, H});
    add(n.o_proj, "weight", {H, q_out});
    if (qkv_bias) {
      add(n.q_proj, "bias", {q_out});
      add(n.k_proj, "bias", {kv_out});
      add(n.v_proj, "bias", {kv_out});
    }
    if (attn_bias) add(n.o_proj, "bias", {H});
    if (a.qk_norm) {
      add(n.q_norm, "weight", {D});
      add(n.k_norm, "weight", {D});
    }
    add(n.post_attention_layernorm, "weight", {H});
    add(n.gate_proj, "weight", {I, H});
    add(n.up_proj, "weight", {I, H});
    add(n.down_proj, "weight", {H, I});
    if (mlp_bias) {
      add(n.gate_proj, "bias", {I});
      add(n.up_proj, "bias", {I});
      add(n.down_proj, "bias", {H});
    }
  }
  t.push_back({"model.norm.weight", {H}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, H}});
  return t;
}

}  // namespace nanscope
