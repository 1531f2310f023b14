// Writes small checkpoints by hand for tests of structure and bad input (the numerical goldens
// come from transformers; these only need the right names, shapes and a few planted values).
#pragma once

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "formats/hf_config.hpp"
#include "formats/safetensors.hpp"
#include "model/arch.hpp"

namespace nanscope::testing {

inline nlohmann::json tiny_qwen3_config() {
  return {{"model_type", "qwen3"},
          {"architectures", {"Qwen3ForCausalLM"}},
          {"hidden_size", 16},
          {"intermediate_size", 32},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 2},
          {"num_key_value_heads", 1},
          {"head_dim", 8},
          {"vocab_size", 32},
          {"max_position_embeddings", 64},
          {"rms_norm_eps", 1e-6},
          {"tie_word_embeddings", true},
          {"dtype", "bfloat16"},
          {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 10000.0}}}};
}

struct PlantedTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<float> values;  // empty: filled with a small ramp
};

// The tensors a config expects, as PlantedTensors in the given dtype (values a small ramp).
inline std::vector<PlantedTensor> expected_planted(const nlohmann::json& cfg, DType t) {
  std::vector<PlantedTensor> out;
  for (const auto& e : expected_tensors(parse_model_config(cfg, "test config")))
    out.push_back({e.name, t, e.shape, {}});
  return out;
}

inline void write_json(const std::filesystem::path& p, const nlohmann::json& j) {
  std::ofstream(p) << j.dump(2);
}

// Writes tensors into DIR/file (and config.json when cfg is given).
inline void write_tensors(const std::filesystem::path& file, const std::vector<PlantedTensor>& ts) {
  std::vector<TensorSpec> specs;
  for (const auto& t : ts) specs.push_back({t.name, t.dtype, t.shape});
  SafetensorsWriter w(file, specs);
  for (const auto& t : ts) {
    size_t n = 1;
    for (auto d : t.shape) n *= size_t(d);
    std::vector<float> v = t.values;
    if (v.empty())
      for (size_t i = 0; i < n; ++i) v.push_back(0.01f * float(int(i % 17) - 8));
    std::vector<std::byte> bytes(n * size_t(dtype_bits(t.dtype) / 8));
    store_from_f32(v.data(), t.dtype, bytes.data(), n);
    w.write(bytes);
  }
  w.commit();
}

inline void write_model(const std::filesystem::path& dir, const nlohmann::json& cfg,
                        const std::vector<PlantedTensor>& ts) {
  std::filesystem::create_directories(dir);
  write_json(dir / "config.json", cfg);
  write_tensors(dir / "model.safetensors", ts);
}

}  // namespace nanscope::testing
