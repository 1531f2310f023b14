// config.json of a Hugging Face checkpoint, read in both spellings that occur in real files:
// older `torch_dtype` / `rope_theta` / `rope_scaling` and transformers 5's `dtype` /
// `rope_parameters`.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
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
  std::optional<double> original_max_position;   // yarn, llama3, dynamic
  double low_freq_factor = 1.0;                  // llama3
  double high_freq_factor = 4.0;                 // llama3
  double beta_fast = 32.0, beta_slow = 1.0;      // yarn
  std::optional<double> attention_factor;        // yarn (mscale of the cos/sin tables)
  std::optional<double> mscale, mscale_all_dim;  // yarn (DeepSeek spelling)
  bool truncate = true;                          // yarn
  std::optional<double> partial_rotary_factor;
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
  nlohmann::json raw;  // the whole file, kept so merge can write it back with few edits
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
