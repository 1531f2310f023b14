// Writes a synthetic Hugging Face checkpoint of a supported shape (Qwen3-4B's by
// default) with random, realistic weights (normal(0, 0.02); norms near 1), and optionally a LoRA
// adapter for it, so benchmarks run at real sizes without downloading a model.
//
//   make_synthetic --out DIR [--preset qwen3-4b|qwen3-0.6b|qwen3-30b-a3b|tiny]
//                  [--dtype bf16|fp16|fp32] [--layers N] [--shard-gb 4]
//                  [--adapter DIR --rank 16] [--seed 1]
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "formats/hf_config.hpp"
#include "formats/safetensors.hpp"
#include "model/arch.hpp"

using namespace nanscope;
namespace fs = std::filesystem;

namespace {

nlohmann::json preset(const std::string& name) {
  if (name == "qwen3-4b")
    return {{"model_type", "qwen3"},    {"architectures", {"Qwen3ForCausalLM"}},
            {"hidden_size", 2560},      {"intermediate_size", 9728},
            {"num_hidden_layers", 36},  {"num_attention_heads", 32},
            {"num_key_value_heads", 8}, {"head_dim", 128},
            {"vocab_size", 151936},     {"max_position_embeddings", 40960},
            {"rms_norm_eps", 1e-6},     {"tie_word_embeddings", true},
            {"hidden_act", "silu"},     {"rope_theta", 1000000.0},
            {"attention_bias", false}};
  if (name == "qwen3-0.6b")
    return {{"model_type", "qwen3"},    {"architectures", {"Qwen3ForCausalLM"}},
            {"hidden_size", 1024},      {"intermediate_size", 3072},
            {"num_hidden_layers", 28},  {"num_attention_heads", 16},
            {"num_key_value_heads", 8}, {"head_dim", 128},
            {"vocab_size", 151936},     {"max_position_embeddings", 40960},
            {"rms_norm_eps", 1e-6},     {"tie_word_embeddings", true},
            {"hidden_act", "silu"},     {"rope_theta", 1000000.0},
            {"attention_bias", false}};
  if (name == "tiny")
    return {{"model_type", "qwen3"},    {"architectures", {"Qwen3ForCausalLM"}},
            {"hidden_size", 256},       {"intermediate_size", 768},
            {"num_hidden_layers", 4},   {"num_attention_heads", 8},
            {"num_key_value_heads", 4}, {"head_dim", 64},
            {"vocab_size", 4096},       {"max_position_embeddings", 4096},
            {"rms_norm_eps", 1e-6},     {"tie_word_embeddings", true},
            {"hidden_act", "silu"},     {"rope_theta", 1000000.0}};
  if (name == "qwen3-30b-a3b")  // the mixture of experts: 128 experts, 8 per token
    return {{"model_type", "qwen3_moe"},
            {"architectures", {"Qwen3MoeForCausalLM"}},
            {"hidden_size", 2048},
            {"intermediate_size", 6144},
            {"moe_intermediate_size", 768},
            {"num_hidden_layers", 48},
            {"num_attention_heads", 32},
            {"num_key_value_heads", 4},
            {"head_dim", 128},
            {"num_experts", 128},
            {"num_experts_per_tok", 8},
            {"norm_topk_prob", true},
            {"decoder_sparse_step", 1},
            {"mlp_only_layers", nlohmann::json::array()},
            {"vocab_size", 151936},
            {"max_position_embeddings", 40960},
            {"rms_norm_eps", 1e-6},
            {"tie_word_embeddings", false},
            {"hidden_act", "silu"},
            {"rope_theta", 1000000.0},
            {"attention_bias", false}};
  fail("unknown preset {} (qwen3-4b, qwen3-0.6b, qwen3-30b-a3b, tiny)", name);
}

// Fills n values of dtype t with normal(mean, std) from a per-chunk seeded generator, threaded.
void fill(std::vector<std::byte>& buf, DType t, size_t n, float mean, float stddev, uint64_t seed) {
  const size_t esz = size_t(dtype_bits(t) / 8);
  buf.resize(n * esz);
  const unsigned nt = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < nt; ++w) {
    pool.emplace_back([&, w] {
      const size_t b = n * w / nt, e = n * (w + 1) / nt;
      std::mt19937_64 rng(seed * 7919 + w);
      std::normal_distribution<float> d(mean, stddev);
      std::vector<float> tmp(4096);
      for (size_t i = b; i < e; i += tmp.size()) {
        const size_t m = std::min(tmp.size(), e - i);
        for (size_t k = 0; k < m; ++k) tmp[k] = d(rng);
        store_from_f32(tmp.data(), t, buf.data() + i * esz, m);
      }
    });
  }
  for (auto& th : pool) th.join();
}

void write_json(const fs::path& p, const nlohmann::json& j) {
  std::ofstream(p) << j.dump(2) << "\n";
}

}  // namespace

int main(int argc, char** argv) try {
  std::string out, preset_name = "qwen3-4b", dtype = "bf16", adapter;
  double shard_gb = 4.0;
  int rank = 16;
  int64_t layers = 0;  // 0: the preset's
  uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) fail("{} needs a value", a);
      return argv[++i];
    };
    if (a == "--out")
      out = next();
    else if (a == "--preset")
      preset_name = next();
    else if (a == "--dtype")
      dtype = next();
    else if (a == "--shard-gb")
      shard_gb = std::stod(next());
    else if (a == "--adapter")
      adapter = next();
    else if (a == "--layers")
      layers = std::stoll(next());
    else if (a == "--rank")
      rank = std::stoi(next());
    else if (a == "--seed")
      seed = std::stoull(next());
    else
      fail("unknown argument {}", a);
  }
  if (out.empty()) fail("--out DIR is required");
  const DType t = dtype == "bf16" ? DType::BF16 : dtype == "fp16" ? DType::F16 : DType::F32;
  nlohmann::json cj = preset(preset_name);
  cj["dtype"] = torch_dtype_name(t);
  if (layers > 0) cj["num_hidden_layers"] = layers;
  const ModelConfig cfg = parse_model_config(cj, "preset " + preset_name);
  const auto tensors = expected_tensors(cfg);
  fs::create_directories(out);
  write_json(fs::path(out) / "config.json", cj);

  // Greedy sharding like transformers' max_shard_size.
  const uint64_t limit = uint64_t(shard_gb * 1e9);
  std::vector<std::vector<const ExpectedTensor*>> shards(1);
  uint64_t cur = 0, total = 0;
  for (const auto& e : tensors) {
    uint64_t n = 1;
    for (auto d : e.shape) n *= uint64_t(d);
    const uint64_t b = n * uint64_t(dtype_bits(t) / 8);
    if (cur > 0 && cur + b > limit) shards.emplace_back(), cur = 0;
    shards.back().push_back(&e);
    cur += b;
    total += b;
  }
  nlohmann::json weight_map = nlohmann::json::object();
  std::vector<std::byte> buf;
  uint64_t k = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file = shards.size() == 1 ? "model.safetensors"
                                                : fmt::format("model-{:05d}-of-{:05d}.safetensors",
                                                              s + 1, shards.size());
    std::vector<TensorSpec> specs;
    for (const auto* e : shards[s]) specs.push_back({e->name, t, e->shape});
    SafetensorsWriter w(fs::path(out) / file, specs, {{"format", "pt"}});
    for (const auto* e : shards[s]) {
      size_t n = 1;
      for (auto d : e->shape) n *= size_t(d);
      const bool norm = e->name.find("norm") != std::string::npos;
      fill(buf, t, n, norm ? 1.0f : 0.0f, norm ? 0.1f : 0.02f, seed * 100003 + ++k);
      w.write(buf);
      weight_map[e->name] = file;
    }
    w.commit();
    fmt::print(stderr, "wrote {}\n", file);
  }
  if (shards.size() > 1)
    write_json(fs::path(out) / "model.safetensors.index.json",
               {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}});

  if (!adapter.empty()) {
    // A LoRA adapter on every linear layer, saved fp32 as peft does.
    fs::create_directories(adapter);
    write_json(fs::path(adapter) / "adapter_config.json",
               {{"peft_type", "LORA"},
                {"r", rank},
                {"lora_alpha", 2 * rank},
                {"target_modules",
                 {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}},
                {"lora_dropout", 0.0},
                {"bias", "none"},
                {"task_type", "CAUSAL_LM"},
                {"use_rslora", false},
                {"use_dora", false},
                {"fan_in_fan_out", false}});
    std::vector<TensorSpec> specs;
    for (const auto& e : tensors) {
      if (e.shape.size() != 2 || e.name.find("embed") != std::string::npos ||
          e.name.rfind("lm_head", 0) == 0)
        continue;
      const std::string m = "base_model.model." + e.name.substr(0, e.name.size() - 7);
      specs.push_back({m + ".lora_A.weight", DType::F32, {rank, e.shape[1]}});
      specs.push_back({m + ".lora_B.weight", DType::F32, {e.shape[0], rank}});
    }
    SafetensorsWriter w(fs::path(adapter) / "adapter_model.safetensors", specs);
    for (const auto& sp : specs) {
      fill(buf, DType::F32, size_t(sp.shape[0] * sp.shape[1]), 0.0f, 0.01f, ++k);
      w.write(buf);
    }
    w.commit();
  }
  fmt::print("{{\"out\": \"{}\", \"bytes\": {}, \"shards\": {}}}\n", out, total, shards.size());
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "make_synthetic: {}\n", e.what());
  return 2;
}
