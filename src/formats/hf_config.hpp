// config.json of a Hugging Face checkpoint, read in both spellings that occur in real files:
// older `torch_dtype` / `rope_theta` / `rope_scaling` and transformers 5's `dtype` /
// `rope_parameters`.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "numerics/dtype.hpp"

namespace nanscope {

struct RopeConfig {
  std::string type = "default";  // default | linear | dynamic | yarn | llama3
  double theta = 10000.0;
  double factor = 1.0;                           // linear, dynamic, yarn, llama3
  bool has_factor = false;                       // longrope derives it when absent
  std::optional<double> original_max_position;   // yarn, llama3, dynamic
  double low_freq_factor = 1.0;                  // llama3
  double high_freq_factor = 4.0;                 // llama3
  double beta_fast = 32.0, beta_slow = 1.0;      // yarn
  std::optional<double> attention_factor;        // yarn (mscale of the cos/sin tables)
  std::optional<double> mscale, mscale_all_dim;  // yarn (DeepSeek spelling)
  bool truncate = true;                          // yarn
  std::optional<double> partial_rotary_factor;
  std::vector<double> short_factor, long_factor;  // longrope (Phi-3)
};

struct ModelConfig {
  std::string model_type;  // "qwen3", "qwen2", "llama"
  std::vector<std::string> architectures;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // explicit in Qwen3; hidden/heads when absent
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  std::string hidden_act = "silu";
  std::optional<DType> dtype;  // `dtype` or `torch_dtype`, absent in some files
  RopeConfig rope;
  // Gemma 3: RoPE per layer type ("full_attention", "sliding_attention"); empty elsewhere.
  std::map<std::string, RopeConfig> rope_by_layer_type;
  std::optional<int64_t> original_max_position_embeddings;  // Phi-3 (longrope)

  // Attention variants. sliding_window as written; which layers use it is the architecture's
  // rule (model/arch.cpp), from layer_types or use_sliding_window / max_window_layers.
  std::optional<int64_t> sliding_window;
  std::optional<bool> use_sliding_window;
  std::optional<int64_t> max_window_layers;
  std::vector<std::string> layer_types;
  std::optional<double> query_pre_attn_scalar;    // Gemma: scaling = scalar^-0.5
  std::optional<double> attn_logit_softcapping;   // Gemma 2
  std::optional<double> final_logit_softcapping;  // Gemma 2
  bool use_bidirectional_attention = false;       // Gemma 3 (embedding variants): not causal

  // Mixture of experts (Qwen2-MoE, Qwen3-MoE, Mixtral); num_experts 0 for dense models.
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  int64_t shared_expert_intermediate_size = 0;
  bool norm_topk_prob = false;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  nlohmann::json raw;  // the whole file, kept so merge can write it back with few edits
  // A multimodal checkpoint's text tower (Gemma 3's Gemma3ForConditionalGeneration): the
  // fields above are its text_config's; its tensors sit under `text_prefix` ("" otherwise)
  // beside a vision tower the text forward pass does not read.
  std::string multimodal_type;  // "gemma3", or empty
  std::string text_prefix;      // "language_model." for Gemma 3's saved layout
  std::string source;           // the config.json read ("DIR/config.json"), for messages
};

// Parses and checks config.json; `what` names the file in messages. Throws InputError.
ModelConfig parse_model_config(const nlohmann::json& j, const std::string& what);
ModelConfig load_model_config(const std::filesystem::path& config_json);

// Reads a whole JSON file, naming it in the error when it is missing or not JSON.
nlohmann::json read_json_file(const std::filesystem::path& p);
// The same from text; `what` names it in the message (the fuzz target drives it).
nlohmann::json parse_json_text(std::string_view text, const std::string& what);

// "bfloat16" / "float16" / "float32" (and the "torch." prefixed spellings) to a DType.
std::optional<DType> parse_torch_dtype(const std::string& s);
std::string torch_dtype_name(DType t);  // "bfloat16"

}  // namespace nanscope
