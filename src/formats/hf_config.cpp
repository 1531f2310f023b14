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

std::optional<DType> parse_torch_dtype(const std::string& s) {
  return parse_float_dtype(s);
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

std::vector<double> get_num_list(const nlohmann::json& j, const char* key,
                                 const std::string& what) {
  std::vector<double> v;
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return v;
  if (!it->is_array()) fail("{}: `{}` must be a list of numbers, found {}", what, key, it->dump());
  for (const auto& x : *it) {
    if (!x.is_number()) fail("{}: `{}` must be a list of numbers, found {}", what, key, x.dump());
    v.push_back(x.get<double>());
  }
  return v;
}

std::optional<int64_t> get_opt_int(const nlohmann::json& j, const char* key,
                                   const std::string& what) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer())
    fail("{}: `{}` must be an integer, found {}", what, key, it->dump());
  return it->get<int64_t>();
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
  r.has_factor = p.contains("factor") && !p["factor"].is_null();
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
  r.short_factor = get_num_list(p, "short_factor", w);
  r.long_factor = get_num_list(p, "long_factor", w);
  return r;
}

// Gemma 3 writes one set of rope parameters per layer type; older files `rope_theta` (global)
// and `rope_local_base_freq` (sliding layers) with `rope_scaling` for the global ones.
std::map<std::string, RopeConfig> parse_rope_by_layer_type(const nlohmann::json& j,
                                                           const std::string& what) {
  std::map<std::string, RopeConfig> out;
  auto it = j.find("rope_parameters");
  if (it != j.end() && it->is_object()) {
    for (const char* lt : {"full_attention", "sliding_attention"}) {
      auto p = it->find(lt);
      if (p == it->end() || !p->is_object()) continue;
      nlohmann::json sub = {{"rope_parameters", *p}};
      out[lt] = parse_rope(sub, what + " (rope_parameters." + lt + ")");
    }
    if (!out.empty()) return out;
  }
  if (auto lb = j.find("rope_local_base_freq"); lb != j.end() && !lb->is_null()) {
    out["full_attention"] = parse_rope(j, what);
    RopeConfig local;
    local.theta = get_num(j, "rope_local_base_freq", 10000.0, what);
    out["sliding_attention"] = local;
  }
  return out;
}

}  // namespace

ModelConfig parse_model_config(const nlohmann::json& j, const std::string& what) {
  if (!j.is_object()) fail("{}: expected a JSON object", what);
  // A multimodal Gemma 3: the text tower's config is text_config, with the top level's dtype.
  if (auto mt = j.find("model_type"); mt != j.end() && *mt == "gemma3") {
    auto tc = j.find("text_config");
    if (tc == j.end() || !tc->is_object())
      fail("{}: model_type gemma3 without a `text_config` object", what);
    nlohmann::json text = *tc;
    text["model_type"] = text.value("model_type", "gemma3_text");
    for (const char* key : {"dtype", "torch_dtype", "tie_word_embeddings"})
      if (!text.contains(key) && j.contains(key)) text[key] = j[key];
    ModelConfig c = parse_model_config(text, what + " (text_config)");
    if (c.model_type != "gemma3_text")
      fail("{}: text_config has model_type \"{}\", expected gemma3_text", what, c.model_type);
    c.raw = j;
    c.multimodal_type = "gemma3";
    c.text_prefix = "language_model.";
    if (auto a = j.find("architectures"); a != j.end() && a->is_array()) {
      c.architectures.clear();
      for (const auto& x : *a)
        if (x.is_string()) c.architectures.push_back(x.get<std::string>());
    }
    return c;
  }
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
  // Gemma names it hidden_activation (hidden_act is an older alias there).
  if (auto it = j.find("hidden_activation"); it != j.end() && it->is_string())
    c.hidden_act = it->get<std::string>();
  c.rope_by_layer_type = parse_rope_by_layer_type(j, what);
  c.rope =
      c.rope_by_layer_type.empty() ? parse_rope(j, what) : c.rope_by_layer_type.begin()->second;
  c.original_max_position_embeddings = get_opt_int(j, "original_max_position_embeddings", what);

  c.sliding_window = get_opt_int(j, "sliding_window", what);
  if (auto it = j.find("use_sliding_window"); it != j.end() && !it->is_null())
    c.use_sliding_window = get_bool(j, "use_sliding_window", false, what);
  c.max_window_layers = get_opt_int(j, "max_window_layers", what);
  if (auto it = j.find("layer_types"); it != j.end() && !it->is_null()) {
    if (!it->is_array()) fail("{}: `layer_types` must be a list, found {}", what, it->dump());
    for (const auto& t : *it) {
      if (!t.is_string()) fail("{}: `layer_types` holds {}, not a string", what, t.dump());
      c.layer_types.push_back(t.get<std::string>());
    }
    if (int64_t(c.layer_types.size()) != c.num_hidden_layers)
      fail("{}: `layer_types` has {} entries for {} layers", what, c.layer_types.size(),
           c.num_hidden_layers);
  }
  c.query_pre_attn_scalar = get_opt_num(j, "query_pre_attn_scalar", what);
  c.attn_logit_softcapping = get_opt_num(j, "attn_logit_softcapping", what);
  c.final_logit_softcapping = get_opt_num(j, "final_logit_softcapping", what);
  c.use_bidirectional_attention = get_bool(j, "use_bidirectional_attention", false, what);

  for (const char* key : {"num_experts", "num_local_experts"})
    if (auto e = get_opt_int(j, key, what)) c.num_experts = *e;
  if (c.num_experts < 0) fail("{}: `num_experts` must not be negative", what);
  if (c.num_experts > 0) {
    c.num_experts_per_tok = get_int(j, "num_experts_per_tok", what);
    if (c.num_experts_per_tok > c.num_experts)
      fail("{}: num_experts_per_tok ({}) is more than num_experts ({})", what,
           c.num_experts_per_tok, c.num_experts);
    c.moe_intermediate_size = get_int(j, "moe_intermediate_size", what, c.intermediate_size);
    c.shared_expert_intermediate_size =
        get_opt_int(j, "shared_expert_intermediate_size", what).value_or(0);
    c.norm_topk_prob = get_bool(j, "norm_topk_prob", false, what);
    c.decoder_sparse_step = get_int(j, "decoder_sparse_step", what, 1);
    if (auto it = j.find("mlp_only_layers"); it != j.end() && !it->is_null()) {
      if (!it->is_array()) fail("{}: `mlp_only_layers` must be a list, found {}", what, it->dump());
      for (const auto& v : *it) {
        if (!v.is_number_integer())
          fail("{}: `mlp_only_layers` holds {}, not a layer index", what, v.dump());
        c.mlp_only_layers.push_back(v.get<int64_t>());
      }
    }
  }
  return c;
}

ModelConfig load_model_config(const std::filesystem::path& p) {
  ModelConfig c = parse_model_config(read_json_file(p), p.string());
  c.source = p.string();
  return c;
}

}  // namespace nanscope
