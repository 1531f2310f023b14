#include "formats/adapter.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cmath>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <unordered_map>

#include "common/error.hpp"
#include "common/json_depth.hpp"
#include "formats/hub.hpp"

namespace nanscope {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

// ---- regex (Python `re` semantics through PCRE2) ---------------------------------------------

namespace {

struct CompiledRegex {
  pcre2_code* code = nullptr;
  ~CompiledRegex() {
    if (code) pcre2_code_free(code);
  }
};

// Patterns come from one config and are few; compile each once per process.
const pcre2_code* compile_cached(const std::string& pattern, const std::string& what) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<CompiledRegex>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(pattern);
  if (it != cache.end()) return it->second->code;
  int err = 0;
  PCRE2_SIZE off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF, &err, &off, nullptr);
  if (!code) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof buf);
    fail("{}: the regular expression `{}` does not compile ({} at offset {})", what, pattern,
         reinterpret_cast<const char*>(buf), size_t(off));
  }
  auto c = std::make_unique<CompiledRegex>();
  c->code = code;
  const pcre2_code* p = c->code;
  cache.emplace(pattern, std::move(c));
  return p;
}

// Returns the end offset of an anchored match at 0, or -1.
long match_at_start(const pcre2_code* code, const std::string& text, bool to_end) {
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
  uint32_t opts = PCRE2_ANCHORED | (to_end ? PCRE2_ENDANCHORED : 0u);
  int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), 0, opts, md,
                       nullptr);
  long end = -1;
  if (rc >= 0) end = long(pcre2_get_ovector_pointer(md)[1]);
  pcre2_match_data_free(md);
  return end;
}

}  // namespace

bool regex_fullmatch(const std::string& pattern, const std::string& text, const std::string& what) {
  return match_at_start(compile_cached(pattern, what), text, true) >= 0;
}

bool regex_match_start(const std::string& pattern, const std::string& text,
                       const std::string& what) {
  return match_at_start(compile_cached(pattern, what), text, false) >= 0;
}

// ---- config ------------------------------------------------------------------------------------

namespace {

bool is_default_value(const ojson& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_object() && v.empty()) ||
         (v.is_array() && v.empty());
}

std::vector<std::string> string_list(const ojson& v, const char* key, const std::string& what) {
  std::vector<std::string> out;
  if (!v.is_array()) fail("{}: `{}` must be a list of strings, found {}", what, key, v.dump());
  for (const auto& e : v) {
    if (!e.is_string()) fail("{}: `{}` must be a list of strings, found {}", what, key, v.dump());
    out.push_back(e.get<std::string>());
  }
  return out;
}

bool get_bool(const ojson& j, const char* key, bool dflt, const std::string& what) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) fail("{}: `{}` must be true or false, found {}", what, key, it->dump());
  return it->get<bool>();
}

// Fields that never change what a merge computes (bookkeeping, training-only settings, the
// initialisation of weights that are then loaded from the file).
const std::set<std::string>& harmless_fields() {
  static const std::set<std::string> s = {"task_type",
                                          "peft_type",
                                          "auto_mapping",
                                          "peft_version",
                                          "base_model_name_or_path",
                                          "revision",
                                          "inference_mode",
                                          "lora_dropout",
                                          "megatron_core",
                                          "qalora_group_size",
                                          "runtime_config",
                                          "eva_config",
                                          "corda_config",
                                          "lora_ga_config",
                                          "loftq_config",
                                          "modules_to_tie",
                                          "target_modules_to_tie",
                                          "init_lora_weights"};
  return s;
}

// Fields nanscope reads and honours.
const std::set<std::string>& honoured_fields() {
  static const std::set<std::string> s = {"r",
                                          "lora_alpha",
                                          "target_modules",
                                          "exclude_modules",
                                          "use_rslora",
                                          "use_dora",
                                          "rank_pattern",
                                          "alpha_pattern",
                                          "fan_in_fan_out",
                                          "bias",
                                          "lora_bias",
                                          "modules_to_save",
                                          "layers_to_transform",
                                          "layers_pattern",
                                          "trainable_token_indices",
                                          "ensure_weight_tying"};
  return s;
}

// Semantic fields nanscope does not implement: any non-default value is refused, with why.
const std::map<std::string, std::string>& refused_fields() {
  static const std::map<std::string, std::string> m = {
      {"use_qalora", "QALoRA (quantisation-aware LoRA) pools the input features"},
      {"megatron_config", "Megatron parallel LoRA layers"},
      {"alora_invocation_tokens",
       "activated LoRA applies the update only after invocation tokens "
       "and cannot be merged (peft says so too)"},
      {"velora_config", "the VeLoRA variant"},
      {"monteclora_config", "the MonteCLoRA variant"},
      {"kasa_config", "the KaSA variant (it changes the base weight's singular values)"},
      {"use_bdlora", "block-diagonal LoRA"},
      {"arrow_config", "Arrow routing (a mixture of LoRA experts, not mergeable)"},
      {"layer_replication", "layer replication (the merged model has more layers than the base)"},
      {"target_parameters", "LoRA on nn.Parameter targets (MoE experts)"},
  };
  return m;
}

}  // namespace

AdapterConfig parse_adapter_config(const nlohmann::json& j, const std::string& what) {
  return parse_adapter_config(ojson::parse(j.dump()), what);
}

AdapterConfig parse_adapter_config(const ojson& j, const std::string& what) {
  AdapterConfig c;
  if (!j.is_object()) fail("{}: not a JSON object", what);
  c.raw = j;

  auto pt = j.find("peft_type");
  if (pt == j.end() || !pt->is_string())
    fail("{}: `peft_type` is missing (not a PEFT adapter config?)", what);
  c.peft_type = pt->get<std::string>();
  if (c.peft_type != "LORA")
    fail("{}: peft_type is {}, only LORA adapters can be merged", what, c.peft_type);

  // Refuse what we cannot honour before reading the rest, naming the field.
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    if (harmless_fields().count(k) || honoured_fields().count(k)) continue;
    auto r = refused_fields().find(k);
    if (is_default_value(it.value())) continue;
    if (r != refused_fields().end())
      fail("{}: `{}` is set ({}): {} is not supported by nanscope merge", what, k,
           it.value().dump(), r->second);
    fail(
        "{}: unknown field `{}` is set to {}; nanscope does not know whether it changes the "
        "merge, so it refuses rather than guess",
        what, k, it.value().dump());
  }

  if (auto it = j.find("init_lora_weights"); it != j.end() && !it->is_null()) {
    if (it->is_boolean()) {
      c.init_lora_weights = it->get<bool>() ? "true" : "false";
    } else if (it->is_string()) {
      c.init_lora_weights = it->get<std::string>();
      const std::string& s = c.init_lora_weights;
      if (s == "loftq")
        fail(
            "{}: init_lora_weights is \"loftq\": a LoftQ adapter belongs to a quantised base "
            "whose residual it corrects; nanscope merges only into unquantised checkpoints",
            what);
      if (s.rfind("pissa", 0) == 0 || s == "olora" || s == "corda" || s == "lora_ga")
        fail(
            "{}: init_lora_weights is \"{}\": this adapter was trained against a base whose "
            "weights {} changed at initialisation, and it was saved without conversion. Re-save "
            "it with save_pretrained(..., path_initial_model_for_weight_conversion=...) so it "
            "applies to the original base",
            what, s, s);
      if (s == "mica")
        fail("{}: init_lora_weights is \"mica\", a LoRA variant nanscope does not implement", what);
    } else {
      fail("{}: `init_lora_weights` must be a bool or a string, found {}", what, it->dump());
    }
  }

  if (auto it = j.find("r"); it != j.end()) {
    if (!it->is_number_integer() || it->get<int64_t>() <= 0)
      fail("{}: `r` must be a positive integer, found {}", what, it->dump());
    c.r = it->get<int64_t>();
  }
  if (auto it = j.find("lora_alpha"); it != j.end() && !it->is_null()) {
    if (!it->is_number()) fail("{}: `lora_alpha` must be a number, found {}", what, it->dump());
    c.lora_alpha = it->get<double>();
  }
  if (auto it = j.find("target_modules"); it != j.end() && !it->is_null()) {
    if (it->is_string())
      c.target_modules_regex = it->get<std::string>();
    else
      c.target_modules = string_list(*it, "target_modules", what);
  }
  if (auto it = j.find("exclude_modules"); it != j.end() && !it->is_null()) {
    if (it->is_string())
      c.exclude_modules_regex = it->get<std::string>();
    else
      c.exclude_modules = string_list(*it, "exclude_modules", what);
  }
  c.use_rslora = get_bool(j, "use_rslora", false, what);
  c.use_dora = get_bool(j, "use_dora", false, what);
  c.fan_in_fan_out = get_bool(j, "fan_in_fan_out", false, what);
  c.lora_bias = get_bool(j, "lora_bias", false, what);
  c.ensure_weight_tying = get_bool(j, "ensure_weight_tying", false, what);
  if (auto it = j.find("bias"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) fail("{}: `bias` must be a string, found {}", what, it->dump());
    c.bias = it->get<std::string>();
    if (c.bias != "none" && c.bias != "all" && c.bias != "lora_only")
      fail("{}: `bias` is \"{}\"; peft knows none, all and lora_only", what, c.bias);
  }
  if (auto it = j.find("rank_pattern"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) fail("{}: `rank_pattern` must be an object, found {}", what, it->dump());
    for (auto e = it->begin(); e != it->end(); ++e) {
      if (!e.value().is_number_integer() || e.value().get<int64_t>() <= 0)
        fail("{}: rank_pattern[\"{}\"] must be a positive integer, found {}", what, e.key(),
             e.value().dump());
      c.rank_pattern.emplace_back(e.key(), e.value().get<int64_t>());
    }
  }
  if (auto it = j.find("alpha_pattern"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) fail("{}: `alpha_pattern` must be an object, found {}", what, it->dump());
    for (auto e = it->begin(); e != it->end(); ++e) {
      if (!e.value().is_number())
        fail("{}: alpha_pattern[\"{}\"] must be a number, found {}", what, e.key(),
             e.value().dump());
      c.alpha_pattern.emplace_back(e.key(), e.value().get<double>());
    }
  }
  if (auto it = j.find("modules_to_save"); it != j.end() && !it->is_null())
    c.modules_to_save = string_list(*it, "modules_to_save", what);
  if (auto it = j.find("layers_to_transform"); it != j.end() && !it->is_null()) {
    std::vector<int64_t> v;
    if (it->is_number_integer()) {
      v.push_back(it->get<int64_t>());
    } else if (it->is_array()) {
      for (const auto& e : *it) {
        if (!e.is_number_integer())
          fail("{}: `layers_to_transform` must be an int or a list of ints, found {}", what,
               it->dump());
        v.push_back(e.get<int64_t>());
      }
    } else {
      fail("{}: `layers_to_transform` must be an int or a list of ints, found {}", what,
           it->dump());
    }
    c.layers_to_transform = v;
  }
  if (auto it = j.find("layers_pattern"); it != j.end() && !it->is_null()) {
    if (it->is_string())
      c.layers_pattern = {it->get<std::string>()};
    else
      c.layers_pattern = string_list(*it, "layers_pattern", what);
  }
  if (c.target_modules_regex && c.layers_to_transform)
    fail(
        "{}: `layers_to_transform` cannot be used when `target_modules` is a string (peft "
        "refuses this config too)",
        what);
  if (auto it = j.find("trainable_token_indices"); it != j.end() && !it->is_null()) {
    auto ints = [&](const ojson& v, const std::string& key) {
      std::vector<int64_t> out;
      if (!v.is_array())
        fail("{}: trainable_token_indices{} must be a list of token ids, found {}", what, key,
             v.dump());
      for (const auto& e : v) {
        if (!e.is_number_integer() || e.get<int64_t>() < 0)
          fail("{}: trainable_token_indices{} must be a list of token ids, found {}", what, key,
               v.dump());
        out.push_back(e.get<int64_t>());
      }
      return out;
    };
    if (it->is_array()) {
      c.trainable_token_indices[""] = ints(*it, "");
    } else if (it->is_object()) {
      for (auto e = it->begin(); e != it->end(); ++e)
        c.trainable_token_indices[e.key()] = ints(e.value(), "[\"" + e.key() + "\"]");
    } else {
      fail("{}: `trainable_token_indices` must be a list or an object, found {}", what, it->dump());
    }
  }
  if (auto it = j.find("base_model_name_or_path"); it != j.end() && it->is_string())
    c.base_model_name_or_path = it->get<std::string>();
  return c;
}

LoraScale lora_scale_for(const AdapterConfig& c, const std::string& module_name) {
  LoraScale s{c.r, c.lora_alpha, 0.0};
  const std::string what = "adapter_config.json";
  for (const auto& [key, r] : c.rank_pattern) {
    if (regex_match_start("(.*\\.)?(" + key + ")$", module_name, what + " rank_pattern")) {
      s.r = r;
      break;
    }
  }
  for (const auto& [key, a] : c.alpha_pattern) {
    if (regex_match_start("(.*\\.)?(" + key + ")$", module_name, what + " alpha_pattern")) {
      s.alpha = a;
      break;
    }
  }
  // Python computes lora_alpha / r (or / math.sqrt(r)) in double; the multiply by this scale
  // then happens in the adapter's dtype (fp32), where the double is rounded to float.
  s.scale = c.use_rslora ? s.alpha / std::sqrt(double(s.r)) : s.alpha / double(s.r);
  return s;
}

bool is_targeted(const AdapterConfig& c, const std::string& key) {
  const std::string what = "adapter_config.json";
  auto ends_with_dot = [&](const std::string& name) {
    return key.size() > name.size() &&
           key.compare(key.size() - name.size(), name.size(), name) == 0 &&
           key[key.size() - name.size() - 1] == '.';
  };
  if (c.exclude_modules_regex) {
    if (regex_fullmatch(*c.exclude_modules_regex, key, what + " exclude_modules")) return false;
  } else {
    for (const auto& e : c.exclude_modules)
      if (key == e || ends_with_dot(e)) return false;
  }
  for (const auto& m : c.modules_to_save)
    if (regex_match_start("(^|.*\\.)" + m + "($|\\..*)", key, what + " modules_to_save"))
      return false;
  if (c.target_modules_regex) {
    if (*c.target_modules_regex == "all-linear") return key != "lm_head";
    return regex_fullmatch(*c.target_modules_regex, key, what + " target_modules");
  }
  bool found = false;
  for (const auto& t : c.target_modules)
    if (key == t) return true;  // an exact name skips the layer filter, as in peft
  for (const auto& t : c.target_modules)
    if (ends_with_dot(t)) found = true;
  if (!found || !c.layers_to_transform || c.layers_to_transform->empty()) return found;
  std::optional<int64_t> idx;
  auto find_idx = [&](const std::string& pattern) -> bool {
    // (?:^|.*?\.)PATTERN\.(\d+)\.  or, without a pattern, .*?\.[^.]*\.(\d+)\.
    pcre2_code const* code = compile_cached(pattern, what + " layers_pattern");
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
    int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(key.data()), key.size(), 0,
                         PCRE2_ANCHORED, md, nullptr);
    if (rc >= 2) {
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      idx = std::stoll(key.substr(ov[2], ov[3] - ov[2]));
    }
    pcre2_match_data_free(md);
    return rc >= 0;
  };
  if (c.layers_pattern.empty()) {
    find_idx(R"(.*?\.[^.]*\.(\d+)\.)");
  } else {
    for (const auto& p : c.layers_pattern)
      if (find_idx("(?:^|.*?\\.)" + p + "\\.(\\d+)\\.")) break;
  }
  if (!idx) return false;
  for (int64_t l : *c.layers_to_transform)
    if (l == *idx) return true;
  return false;
}

AdapterConfig parse_adapter_config_text(std::string_view text, const std::string& what) {
  ojson j;
  try {
    j = ojson::parse(text, json_depth_limit<ojson>(what));
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for 1e400
    fail("{}: not valid JSON ({})", what, e.what());
  }
  return parse_adapter_config(j, what);
}

Adapter Adapter::open(const fs::path& dir) {
  Adapter a;
  a.dir_ = dir;
  std::error_code ec;
  if (!fs::exists(dir, ec)) fail_not_found(dir, "{}: no such file or directory", dir.string());
  if (!fs::is_directory(dir, ec))
    fail(
        "{}: is a file, not a directory (expected a PEFT adapter directory with "
        "adapter_config.json and adapter_model.safetensors)",
        dir.string());
  const fs::path cfg = dir / "adapter_config.json";
  if (!fs::exists(cfg, ec)) {
    if (fs::exists(dir / "config.json", ec))
      fail(
          "{}: adapter_config.json is missing: this is a model checkpoint (config.json), not a "
          "PEFT adapter; pass it as MODEL or --base",
          cfg.string());
    fail("{}: adapter_config.json is missing (not a PEFT adapter directory?){}", cfg.string(),
         dangling_link_note(cfg));
  }
  {
    std::ifstream in(cfg, std::ios::binary);
    if (!in) fail("{}: cannot open", cfg.string());
    std::stringstream ss;
    ss << in.rdbuf();
    a.config_ = parse_adapter_config_text(ss.str(), cfg.string());
  }
  const fs::path st = dir / "adapter_model.safetensors";
  if (!fs::exists(st, ec)) {
    if (fs::exists(dir / "adapter_model.bin", ec))
      fail(
          "{}: only adapter_model.bin (a pickle) is present, and nanscope reads safetensors "
          "only. Convert it once with Python: `import torch; from safetensors.torch import "
          "save_file; save_file(torch.load('adapter_model.bin', map_location='cpu'), "
          "'adapter_model.safetensors', metadata={{'format': 'pt'}})`, or load it with "
          "PeftModel.from_pretrained and re-save with save_pretrained(dir, "
          "safe_serialization=True)",
          dir.string());
    fail("{}: adapter_model.safetensors is missing{}", dir.string(), dangling_link_note(st));
  }
  a.file_ = SafetensorsFile::open(st);
  return a;
}

}  // namespace nanscope
