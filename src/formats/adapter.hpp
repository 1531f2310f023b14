// A PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "formats/safetensors.hpp"

namespace nanscope {

struct AdapterConfig {
  std::string peft_type;  // only "LORA" is supported
  int64_t r = 8;
  double lora_alpha = 8;
  std::vector<std::string> target_modules;  // names, or
  std::optional<std::string> target_modules_regex;  // a full-match regex (peft: a str)
  bool use_rslora = false;
  bool use_dora = false;
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  bool fan_in_fan_out = false;
  std::string bias = "none";  // none | all | lora_only
  bool lora_bias = false;
  std::vector<std::string> modules_to_save;
  std::vector<int64_t> layers_to_transform;
  std::vector<std::string> layers_pattern;
  std::string base_model_name_or_path;
  nlohmann::json raw;
};

AdapterConfig parse_adapter_config(const nlohmann::json& j, const std::string& what);

// Rank and scale for one module, as peft resolves them: rank_pattern / alpha_pattern keys match
// the module name by the regex `(.*\.)?(KEY)$`, first match wins; scale = alpha/r, or
// alpha/sqrt(r) with use_rslora.
struct LoraScale {
  int64_t r;
  double alpha;
  double scale;
};
LoraScale lora_scale_for(const AdapterConfig& c, const std::string& module_name);

class Adapter {
 public:
  // Opens DIR; adapter_model.bin alone gets an InputError saying how to convert it.
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
