#include "model/arch.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "common/error.hpp"

namespace nanscope {

namespace {
using A = Architecture;
// Adding a family costs one entry here (plus whatever op it truly adds to the forward pass).
const std::array kArchitectures = {
    A{.model_type = "qwen3",
      .qk_norm = true,
      .attention_bias_from_config = true,
      .window = WindowRule::QwenMaxWindow},
    A{.model_type = "qwen2", .qkv_bias_always = true, .window = WindowRule::QwenMaxWindow},
    A{.model_type = "llama", .attention_bias_from_config = true, .mlp_bias_from_config = true},
    A{.model_type = "mistral", .window = WindowRule::AllLayers},
    A{.model_type = "mixtral",
      .window = WindowRule::AllLayers,
      .experts = ExpertNames::Mixtral,
      .router_weights_in_dtype = false,
      .router_renormalise = true},
    A{.model_type = "gemma2",
      .norm = NormKind::RmsOffset,
      .attention_bias_from_config = true,
      .sandwich_norms = true,
      .embed_scale = true,
      .attention_scalar = true,
      .window = WindowRule::LayerTypes},
    A{.model_type = "gemma3_text",
      .norm = NormKind::RmsOffset,
      .qk_norm = true,
      .attention_bias_from_config = true,
      .sandwich_norms = true,
      .embed_scale = true,
      .attention_scalar = true,
      .window = WindowRule::LayerTypes},
    A{.model_type = "phi3",
      .fused_qkv = true,
      .fused_gate_up = true,
      .partial_rotary = true,
      .window = WindowRule::AllLayers},
    A{.model_type = "qwen2_moe",
      .qkv_bias_always = true,
      .window = WindowRule::QwenMaxWindow,
      .experts = ExpertNames::Qwen,
      .shared_expert = true},
    A{.model_type = "qwen3_moe",
      .qk_norm = true,
      .attention_bias_from_config = true,
      .window = WindowRule::AllLayers,
      .experts = ExpertNames::Qwen},
};

// The sliding window of layer l (0: none), as the family's modeling code decides it.
int64_t layer_window(const Architecture& a, const ModelConfig& c, int64_t l) {
  const int64_t sw = c.sliding_window.value_or(0);
  const bool typed = !c.layer_types.empty();
  const bool sliding_type = typed && c.layer_types[size_t(l)] == "sliding_attention";
  switch (a.window) {
    case WindowRule::None:
      return 0;
    case WindowRule::AllLayers:  // Qwen3-MoE's config drops the window without use_sliding_window
      return c.use_sliding_window.value_or(true) && sw > 0 ? sw : 0;
    case WindowRule::LayerTypes: {
      bool sliding = sliding_type;
      if (!typed) {  // the config classes' defaults
        const int64_t pattern = a.model_type == "gemma2" ? 2
                                : c.raw.contains("sliding_window_pattern")
                                    ? c.raw["sliding_window_pattern"].get<int64_t>()
                                    : c.raw.value("_sliding_window_pattern", int64_t(6));
        sliding = pattern > 0 && (l + 1) % pattern != 0;
      }
      return sliding && sw > 0 ? sw : 0;
    }
    case WindowRule::QwenMaxWindow: {
      if (!c.use_sliding_window.value_or(false) || sw <= 0) return 0;
      const bool sliding = typed ? sliding_type : l >= c.max_window_layers.value_or(28);
      return sliding ? sw : 0;
    }
  }
  return 0;
}

Activation activation(const ModelConfig& c, const std::string& what) {
  if (c.hidden_act == "silu" || c.hidden_act == "swish") return Activation::Silu;
  if (c.hidden_act == "gelu_pytorch_tanh") return Activation::GeluTanh;
  fail("{}: hidden_act \"{}\" is not supported (supported: silu, gelu_pytorch_tanh)", what,
       c.hidden_act);
}

bool is_moe_layer(const ModelConfig& c, int64_t l) {
  if (c.num_experts <= 0) return false;
  if (std::find(c.mlp_only_layers.begin(), c.mlp_only_layers.end(), l) != c.mlp_only_layers.end())
    return false;
  return (l + 1) % c.decoder_sparse_step == 0;
}

LayerNames names_of(const Architecture& a, const LayerSpec& s, const std::string& root) {
  LayerNames n;
  n.prefix = fmt::format("{}model.layers.{}.", root, s.index);
  const std::string& p = n.prefix;
  n.input_norm = p + "input_layernorm";
  if (s.attn.fused_qkv) {
    n.qkv_proj = p + "self_attn.qkv_proj";
  } else {
    n.q_proj = p + "self_attn.q_proj";
    n.k_proj = p + "self_attn.k_proj";
    n.v_proj = p + "self_attn.v_proj";
  }
  n.o_proj = p + "self_attn.o_proj";
  if (s.attn.qk_norm) {
    n.q_norm = p + "self_attn.q_norm";
    n.k_norm = p + "self_attn.k_norm";
  }
  if (a.sandwich_norms) {
    n.attn_out_norm = p + "post_attention_layernorm";
    n.mlp_in_norm = p + "pre_feedforward_layernorm";
    n.mlp_out_norm = p + "post_feedforward_layernorm";
  } else {
    n.mlp_in_norm = p + "post_attention_layernorm";
  }
  if (!s.mlp.moe) {
    if (s.mlp.fused_gate_up) {
      n.gate_up_proj = p + "mlp.gate_up_proj";
    } else {
      n.gate_proj = p + "mlp.gate_proj";
      n.up_proj = p + "mlp.up_proj";
    }
    n.down_proj = p + "mlp.down_proj";
  } else if (a.experts == ExpertNames::Mixtral) {
    n.router = p + "block_sparse_moe.gate";
    n.expert_prefix = p + "block_sparse_moe.experts.";
    n.expert_gate = "w1", n.expert_up = "w3", n.expert_down = "w2";
  } else {
    n.router = p + "mlp.gate";
    n.expert_prefix = p + "mlp.experts.";
    n.expert_gate = "gate_proj", n.expert_up = "up_proj", n.expert_down = "down_proj";
    if (s.mlp.shared_intermediate > 0) {
      n.shared_gate_proj = p + "mlp.shared_expert.gate_proj";
      n.shared_up_proj = p + "mlp.shared_expert.up_proj";
      n.shared_down_proj = p + "mlp.shared_expert.down_proj";
      n.shared_expert_gate = p + "mlp.shared_expert_gate";
    }
  }
  return n;
}

}  // namespace

const Architecture& find_architecture(std::string_view model_type, std::string_view what) {
  for (const auto& a : kArchitectures)
    if (a.model_type == model_type) return a;
  fail("{}: model_type \"{}\" is not supported (supported: {})", what, model_type,
       fmt::join(supported_architectures(), ", "));
}

std::vector<std::string_view> supported_architectures() {
  std::vector<std::string_view> v;
  for (const auto& a : kArchitectures) v.push_back(a.model_type);
  return v;
}

ModelSpec model_spec(const ModelConfig& c) {
  const std::string what = c.source.empty() ? "config.json" : c.source;
  const Architecture& a = find_architecture(c.model_type, what);
  if (c.use_bidirectional_attention)
    fail("{}: use_bidirectional_attention true is not supported (only causal attention)", what);
  const Activation act = activation(c, what);
  ModelSpec m;
  m.arch = &a;
  m.hidden = c.hidden_size, m.vocab = c.vocab_size;
  m.norm = a.norm, m.eps = c.rms_norm_eps;
  m.embed_scale = a.embed_scale;
  m.tied = c.tie_word_embeddings;
  if (!c.text_prefix.empty()) {  // a multimodal checkpoint's text tower
    m.embed = c.text_prefix + "model.embed_tokens";
    m.final_norm = c.text_prefix + "model.norm";
    m.lm_head = c.text_prefix + "lm_head";
    m.foreign_prefixes = {"vision_tower.", "multi_modal_projector."};
  }
  if (c.final_logit_softcapping) {
    if (!a.sandwich_norms)
      fail("{}: final_logit_softcapping is not supported for model_type {}", what, c.model_type);
    m.final_softcap = float(*c.final_logit_softcapping);
  }

  // RoPE: one set of parameters, or (Gemma 3) one per layer type.
  int sliding_rope = 0;
  if (!c.rope_by_layer_type.empty()) {
    auto full = c.rope_by_layer_type.find("full_attention");
    auto local = c.rope_by_layer_type.find("sliding_attention");
    if (full == c.rope_by_layer_type.end() || local == c.rope_by_layer_type.end())
      fail(
          "{}: rope_parameters names {} layer types; expected full_attention and "
          "sliding_attention",
          what, c.rope_by_layer_type.size());
    m.ropes = {full->second, local->second};
    sliding_rope = 1;
  } else {
    m.ropes = {c.rope};
  }
  const double partial = c.rope.partial_rotary_factor.value_or(1.0);
  if (partial != 1.0 && !a.partial_rotary)
    fail("{}: partial_rotary_factor {} is not supported for model_type {}", what, partial,
         c.model_type);
  const int64_t rotary_dim = int64_t(double(c.head_dim) * partial);
  if (rotary_dim <= 0 || rotary_dim > c.head_dim || rotary_dim % 2 != 0)
    fail("{}: partial_rotary_factor {} gives {} rotary dimensions of {}", what, partial, rotary_dim,
         c.head_dim);
  if (c.attn_logit_softcapping && !a.sandwich_norms)
    fail("{}: attn_logit_softcapping is not supported for model_type {}", what, c.model_type);

  for (const std::string& t : c.layer_types)
    if (t != "full_attention" && t != "sliding_attention")
      fail("{}: layer_types holds \"{}\"; supported: full_attention, sliding_attention", what, t);
  const bool attn_bias = a.attention_bias_from_config && c.attention_bias;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerSpec s;
    s.index = l;
    AttentionSpec& at = s.attn;
    at.heads = c.num_attention_heads, at.kv_heads = c.num_key_value_heads;
    at.head_dim = c.head_dim;
    // A Python float (double) that torch applies as float32.
    at.scaling = float(std::pow(
        a.attention_scalar ? c.query_pre_attn_scalar.value_or(256.0) : double(c.head_dim), -0.5));
    if (c.attn_logit_softcapping) at.softcap = float(*c.attn_logit_softcapping);
    at.window = layer_window(a, c, l);
    at.rope = (sliding_rope != 0 && at.window > 0) ? sliding_rope : 0;
    if (sliding_rope != 0 && !c.layer_types.empty())
      at.rope = c.layer_types[size_t(l)] == "sliding_attention" ? sliding_rope : 0;
    at.rotary_dim = rotary_dim;
    at.qk_norm = a.qk_norm;
    at.qkv_bias = a.qkv_bias_always || attn_bias;
    at.o_bias = attn_bias;
    at.fused_qkv = a.fused_qkv;

    MlpSpec& mp = s.mlp;
    mp.moe = is_moe_layer(c, l);
    mp.act = act;
    mp.bias = a.mlp_bias_from_config && c.mlp_bias;
    mp.fused_gate_up = a.fused_gate_up;
    mp.intermediate = mp.moe ? c.moe_intermediate_size : c.intermediate_size;
    if (mp.moe) {
      if (a.experts == ExpertNames::None)
        fail("{}: num_experts {} but model_type {} has no mixture of experts", what, c.num_experts,
             c.model_type);
      mp.experts = c.num_experts, mp.top_k = c.num_experts_per_tok;
      mp.norm_topk = a.router_renormalise || c.norm_topk_prob;
      mp.router_in_dtype = a.router_weights_in_dtype;
      if (a.shared_expert) mp.shared_intermediate = c.shared_expert_intermediate_size;
    }
    s.names = names_of(a, s, c.text_prefix);
    m.layers.push_back(std::move(s));
  }
  return m;
}

void scale_embeddings(const ModelSpec& m, float* x, size_t n, DType dt) {
  if (!m.embed_scale) return;
  const float scale = round_to(float(std::sqrt(double(m.hidden))), dt);
  for (size_t i = 0; i < n; ++i) x[i] = round_to(x[i] * scale, dt);
}

std::vector<ExpectedTensor> expected_tensors(const ModelSpec& m) {
  const int64_t H = m.hidden;
  std::vector<ExpectedTensor> t;
  auto add = [&](const std::string& module, const char* param, std::vector<int64_t> shape) {
    if (!module.empty()) t.push_back({module + "." + param, std::move(shape)});
  };
  add(m.embed, "weight", {m.vocab, H});
  for (const LayerSpec& s : m.layers) {
    const LayerNames& n = s.names;
    const AttentionSpec& at = s.attn;
    const int64_t D = at.head_dim, q_out = at.heads * D, kv_out = at.kv_heads * D;
    add(n.input_norm, "weight", {H});
    add(n.qkv_proj, "weight", {q_out + 2 * kv_out, H});
    add(n.q_proj, "weight", {q_out, H});
    add(n.k_proj, "weight", {kv_out, H});
    add(n.v_proj, "weight", {kv_out, H});
    add(n.o_proj, "weight", {H, q_out});
    if (at.qkv_bias) {
      add(n.q_proj, "bias", {q_out});
      add(n.k_proj, "bias", {kv_out});
      add(n.v_proj, "bias", {kv_out});
    }
    if (at.o_bias) add(n.o_proj, "bias", {H});
    add(n.q_norm, "weight", {D});
    add(n.k_norm, "weight", {D});
    add(n.attn_out_norm, "weight", {H});
    add(n.mlp_in_norm, "weight", {H});
    add(n.mlp_out_norm, "weight", {H});
    const MlpSpec& mp = s.mlp;
    const int64_t I = mp.intermediate;
    if (!mp.moe) {
      add(n.gate_up_proj, "weight", {2 * I, H});
      add(n.gate_proj, "weight", {I, H});
      add(n.up_proj, "weight", {I, H});
      add(n.down_proj, "weight", {H, I});
      if (mp.bias) {
        add(n.gate_proj, "bias", {I});
        add(n.up_proj, "bias", {I});
        add(n.down_proj, "bias", {H});
      }
    } else {
      add(n.router, "weight", {mp.experts, H});
      for (int64_t e = 0; e < mp.experts; ++e) {
        add(n.expert(e, n.expert_gate), "weight", {I, H});
        add(n.expert(e, n.expert_up), "weight", {I, H});
        add(n.expert(e, n.expert_down), "weight", {H, I});
      }
      const int64_t S = mp.shared_intermediate;
      add(n.shared_gate_proj, "weight", {S, H});
      add(n.shared_up_proj, "weight", {S, H});
      add(n.shared_down_proj, "weight", {H, S});
      add(n.shared_expert_gate, "weight", {1, H});
    }
  }
  add(m.final_norm, "weight", {H});
  if (!m.tied) add(m.lm_head, "weight", {m.vocab, H});
  return t;
}

std::vector<ExpectedTensor> expected_tensors(const ModelConfig& c) {
  return expected_tensors(model_spec(c));
}

}  // namespace nanscope
