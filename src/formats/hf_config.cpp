#include "formats/hf_config.hpp"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "common/error.hpp"
#include "common/json_depth.hpp"

namespace nanscope {

nlohmann::json read_json_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail("{}: cannot open ({})", p.string(), std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_json_text(ss.str(), p.string());
}

nlohmann::json parse_json_text(std::string_view text, const std::string& what) {
  try {
    return nlohmann::json::parse(text, json_depth_limit<nlohmann::json>(what));
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for 1e400
    fail("{}: not valid JSON ({})", what, e.what());
  }
}

std::optional<DType> parse_torch_dtype(const std::string& s0) {
  std::string s = s0.rfind("torch.", 0) == 0 ? s0.substr(6) : s0;
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16" || s == "half") return DType::F16;
  if (s == "float32" || s == "float") return DType::F32;
  return std::nullopt;
}

std::string torch_dtype_name(DType t) {
  switch (t) {
    case DType::BF16:
      return "bfloat16";
    case DType::F16:
      return "float16";
    case DType::F32:
      return "float32";
    default:
      return std::string(dtype_name(t));
  }
}

namespace {

int64_t get_int(const nlohmann::json& j, const char* key, const std::string& what,
                std::optional<int64_t> dflt = std::nullopt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (dflt) return *dflt;
    fail("{}: `{}` is missing", what, key);
  }
  if (!it->is_number_integer())
    fail("{}: `{}` must be an integer, found {}", what, key, it->dump());
  int64_t v = it->get<int64_t>();
  if (v <= 0) fail("{}: `{}` must be positive, found {}", what, key, v);
  return v;
}

double get_num(const nlohmann::json& j, const char* key, double dflt, const std::string& what) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_number()) fail("{}: `{}` must be a number, found {}", what, key, it->dump());
  return it->get<double>();
}

bool get_bool(const nlohmann::json& j, const char* key, bool dflt, const std::string& what) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) fail("{}: `{}` must be true or false, found {}", what, key, it->dump());
  return it->get<bool>();
}

std::optional<double> get_opt_num(const nlohmann::json& j, const char* key,
                                  const std::string& what) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) fail("{}: `{}` must be a number, found {}", what, key, it->dump());
  return it->get<double>();
}

// RoPE: transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
RopeConfig parse_rope(const nlohmann::json& j, const std::string& what) {
  RopeConfig r;
  r.theta = get_num(j, "rope_theta", 10000.0, what);
  const nlohmann::json* params = nullptr;
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    auto it = j.find(key);
    if (it != j.end() && !it->is_null()) {
      if (!it->is_object()) fail("{}: `{}` must be an object, found {}", what, key, it->dump());
      params = &*it;
      break;
    }
  }
  r.partial_rotary_factor = get_opt_num(j, "partial_rotary_factor", what);
  if (!params) return r;
  const auto& p = *params;
  std::string w = what + " (rope parameters)";
  r.theta = get_num(p, "rope_theta", r.theta, w);
  for (const char* key : {"rope_type", "type"}) {
    auto it = p.find(key);
    if (it != p.end() && it->is_string()) {
      r.type = it->get<std::string>();
      break;
    }
  }
  r.factor = get_num(p, "factor", 1.0, w);
  r.original_max_position = get_opt_num(p, "original_max_position_embeddings", w);
  r.low_freq_factor = get_num(p, "low_freq_factor", 1.0, w);
  r.high_freq_factor = get_num(p, "high_freq_factor", 4.0, w);
  r.beta_fast = get_num(p, "beta_fast", 32.0, w);
  r.beta_slow = get_num(p, "beta_slow", 1.0, w);
  r.attention_factor = get_opt_num(p, "attention_factor", w);
  r.mscale = get_opt_num(p, "mscale", w);
  r.mscale_all_dim = get_opt_num(p, "mscale_all_dim", w);
  r.truncate = get_bool(p, "truncate", true, w);
  if (!r.partial_rotary_factor)
    r.partial_rotary_factor = get_opt_num(p, "partial_rotary_factor", w);
  return r;
}

}  // namespace

ModelConfig parse_model_config(const nlohmann::json& j, const std::string& what) {
  if (!j.is_object()) fail("{}: expected a JSON object", what);
  ModelConfig c;
  c.raw = j;
  auto mt = j.find("model_type");
  if (mt == j.end() || !mt->is_string())
    fail("{}: `model_type` is missing; is this a Hugging Face config.json?", what);
  c.model_type = mt->get<std::string>();
  if (auto a = j.find("architectures"); a != j.end() && a->is_array())
    for (const auto& s : *a)
      if (s.is_string()) c.architectures.push_back(s.get<std::string>());
  c.hidden_size = get_int(j, "hidden_size", what);
  c.intermediate_size = get_int(j, "intermediate_size", what);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", what);
  c.num_attention_heads = get_int(j, "num_attention_heads", what);
  c.num_key_value_heads = get_int(j, "num_key_value_heads", what, c.num_attention_heads);
  c.vocab_size = get_int(j, "vocab_size", what);
  c.max_position_embeddings = get_int(j, "max_position_embeddings", what, 32768);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail("{}: num_attention_heads ({}) is not a multiple of num_key_value_heads ({})", what,
         c.num_attention_heads, c.num_key_value_heads);
  std::optional<int64_t> default_head_dim;
  if (c.hidden_size % c.num_attention_heads == 0)
    default_head_dim = c.hidden_size / c.num_attention_heads;
  c.head_dim = get_int(j, "head_dim", what, default_head_dim);
  if (c.head_dim % 2 != 0) fail("{}: head_dim {} must be even for RoPE", what, c.head_dim);
  c.rms_norm_eps = get_num(j, "rms_norm_eps", 1e-6, what);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", false, what);
  c.attention_bias = get_bool(j, "attention_bias", false, what);
  c.mlp_bias = get_bool(j, "mlp_bias", false, what);
  if (auto it = j.find("hidden_act"); it != j.end() && it->is_string())
    c.hidden_act = it->get<std::string>();
  for (const char* key : {"dtype", "torch_dtype"}) {
    auto it = j.find(key);
    if (it != j.end() && it->is_string()) {
      c.dtype = parse_torch_dtype(it->get<std::string>());
      if (!c.dtype) fail("{}: `{}` {} is not a float dtype nanscope knows", what, key, it->dump());
      break;
    }
  }
  c.rope = parse_rope(j, what);
  return c;
}

ModelConfig load_model_config(const std::filesystem::path& p) {
  return parse_model_config(read_json_file(p), p.string());
}

}  // namespace nanscope
