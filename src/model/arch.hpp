// Architectures as data: for each supported model_type, which optional pieces exist (biases,
// q/k norms), and from that the table of every tensor the checkpoint must hold, with its shape
// computed from config.json (Hugging Face [out, in] layout).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "formats/hf_config.hpp"

namespace nanscope {

struct Architecture {
  std::string_view model_type;
  bool qk_norm;                     // Qwen3: per-head RMSNorm on q and k before RoPE
  bool qkv_bias_always;             // Qwen2: q/k/v biases regardless of config
  bool attention_bias_from_config;  // Llama/Qwen3: `attention_bias` adds q/k/v/o biases
  bool mlp_bias_from_config;        // Llama: `mlp_bias` adds gate/up/down biases
};

// Throws InputError naming the model_type and the supported ones.
const Architecture& find_architecture(std::string_view model_type);
std::vector<std::string_view> supported_architectures();

struct ExpectedTensor {
  std::string name;
  std::vector<int64_t> shape;
  bool required = true;
};

// Every tensor a checkpoint of this config should hold (lm_head only when untied).
std::vector<ExpectedTensor> expected_tensors(const ModelConfig& c);

// Per-layer weights in one place, so the forward pass, merge and scan agree on names.
struct LayerNames {
  std::string prefix;  // "model.layers.3."
  std::string input_layernorm, q_proj, k_proj, v_proj, o_proj, q_norm, k_norm;
  std::string post_attention_layernorm, gate_proj, up_proj,
      down_proj;  // module paths, no ".weight"
};
LayerNames layer_names(int64_t layer);

}  // namespace nanscope
