// A PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors.
// The config is read as peft 0.21 reads it (peft/tuners/lora/config.py); every field that changes
// what a merge must compute and that nanscope does not implement is refused by name.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "formats/safetensors.hpp"

namespace nanscope {

struct AdapterConfig {
  std::string peft_type;  // only "LORA" is supported
  int64_t r = 8;
  double lora_alpha = 8;
  std::vector<std::string> target_modules;           // names, or
  std::optional<std::string> target_modules_regex;   // a full-match regex (peft: a str)
  std::vector<std::string> exclude_modules;          // names, or
  std::optional<std::string> exclude_modules_regex;  // a full-match regex
  bool use_rslora = false;
  bool use_dora = false;
  // Pattern -> value in the order of the file: peft takes the FIRST key that matches (a Python
  // dict keeps insertion order), so the order is part of the meaning.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  bool fan_in_fan_out = false;
  std::string bias = "none";  // none | all | lora_only
  bool lora_bias = false;
  std::vector<std::string> modules_to_save;
  std::optional<std::vector<int64_t>> layers_to_transform;  // an int in the file becomes {int}
  std::vector<std::string> layers_pattern;
  // trainable_token_indices: a list (the input embedding) or {module name: indices}. A list is
  // stored under the key "" (meaning: the input embedding, `embed_tokens`).
  std::map<std::string, std::vector<int64_t>> trainable_token_indices;
  bool ensure_weight_tying = false;
  std::string init_lora_weights = "true";  // informational: "true", "false", "gaussian", ...
  std::string base_model_name_or_path;
  nlohmann::ordered_json raw;
};

// Parses and checks adapter_config.json; `what` names the file in messages. Throws InputError
// for a non-LORA type, malformed fields, and any semantic field set to a value nanscope cannot
// honour (quantisation, LoftQ, aLoRA, VeLoRA, layer_replication, target_parameters, ...).
// Use the ordered_json overload: with nlohmann::json the order of rank_pattern / alpha_pattern
// keys is lost (sorted), which changes which pattern wins when several match.
AdapterConfig parse_adapter_config(const nlohmann::ordered_json& j, const std::string& what);
AdapterConfig parse_adapter_config(const nlohmann::json& j, const std::string& what);
// The same from the text of the file (what Adapter::open reads; the fuzz target drives it).
AdapterConfig parse_adapter_config_text(std::string_view text, const std::string& what);

// Rank and scale for one module, as peft resolves them (peft/utils/other.py get_pattern_key, used
// by peft/tuners/lora/model.py _create_and_replace): the first rank_pattern / alpha_pattern key
// (in file order) for which the module name matches the Python regex `(.*\.)?(KEY)$` from the
// start; scale = alpha/r, or alpha/sqrt(r) with use_rslora. module_name is the module path in the
// transformers model, without the peft prefix: "model.layers.0.self_attn.q_proj".
struct LoraScale {
  int64_t r;
  double alpha;
  double scale;
};
LoraScale lora_scale_for(const AdapterConfig& c, const std::string& module_name);

// Whether peft would put a LoRA layer on this module (peft/tuners/tuners_utils.py
// check_target_module_exists): exclude_modules, modules_to_save, target_modules (names match the
// whole key or a `.name` suffix; a string is a full-match regex), then layers_to_transform with
// layers_pattern. "all-linear" matches every module but lm_head (the caller knows which are
// linear).
bool is_targeted(const AdapterConfig& c, const std::string& module_name);

// Python-`re`-compatible regex helpers (PCRE2 underneath). Throw InputError naming `what` for a
// pattern that does not compile.
bool regex_fullmatch(const std::string& pattern, const std::string& text, const std::string& what);
// re.match: anchored at the start, not necessarily at the end.
bool regex_match_start(const std::string& pattern, const std::string& text,
                       const std::string& what);

class Adapter {
 public:
  // Opens DIR; adapter_model.bin alone gets an InputError saying how to convert it. A missing
  // adapter_config.json is an InputError naming the file.
  static Adapter open(const std::filesystem::path& dir);
  const std::filesystem::path& dir() const { return dir_; }
  const AdapterConfig& config() const { return config_; }
  const SafetensorsFile& file() const { return *file_; }

 private:
  std::filesystem::path dir_;
  AdapterConfig config_;
  std::shared_ptr<SafetensorsFile> file_;
};

}  // namespace nanscope
