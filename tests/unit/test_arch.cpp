// The layer description model_spec() derives from config.json: the rules of each family
// (which layers slide, which RoPE a layer uses, the attention scale, experts), and the bad
// configs it refuses by naming the key and value.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "common/error.hpp"
#include "formats/checkpoint.hpp"
#include "model/arch.hpp"
#include "model/forward.hpp"
#include "model/rope.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;
const fs::path kModels = fs::path(NANSCOPE_FIXTURES) / "models";

ModelSpec spec_of(const std::string& model) {
  return model_spec(load_model_config(kModels / model / "config.json"));
}

nlohmann::json base_config(const std::string& model) {
  return read_json_file(kModels / model / "config.json");
}

std::string error_of(const nlohmann::json& j) {
  try {
    (void)model_spec(parse_model_config(j, "config.json"));
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(Arch, EveryFamilyFixtureHasItsTensorsExactly) {
  for (const char* m :
       {"qwen3-tiny", "qwen2-tiny", "llama-tiny", "mistral-tiny", "gemma2-tiny", "gemma3-tiny",
        "phi3-tiny", "phi4-tiny-partial", "qwen3-moe-tiny", "mixtral-tiny", "qwen2-moe-tiny"}) {
    const Checkpoint ck = Checkpoint::open(kModels / m);
    const auto expected = expected_tensors(ck.config());
    size_t found = 0;
    for (const auto& e : expected) {
      auto t = ck.find(e.name);
      ASSERT_TRUE(t) << m << ": " << e.name;
      EXPECT_EQ(t->info->shape, e.shape) << m << ": " << e.name;
      ++found;
    }
    EXPECT_EQ(found, ck.tensors().size()) << m << ": the checkpoint holds tensors the table lacks";
  }
}

TEST(Arch, SlidingWindowsPerLayerFollowEachFamilysRule) {
  // Mistral: every layer; Qwen2 with use_sliding_window: layers >= max_window_layers (1).
  for (const auto& l : spec_of("mistral-tiny").layers) EXPECT_EQ(l.attn.window, 5);
  const ModelSpec q = spec_of("qwen2-tiny-window");
  EXPECT_EQ(q.layers[0].attn.window, 0);
  EXPECT_EQ(q.layers[1].attn.window, 4);
  EXPECT_EQ(q.layers[2].attn.window, 4);
  // Gemma 2: layer_types alternate, sliding first; Gemma 3: its own list, local RoPE there.
  const ModelSpec g2 = spec_of("gemma2-tiny");
  EXPECT_EQ(g2.layers[0].attn.window, 5);
  EXPECT_EQ(g2.layers[1].attn.window, 0);
  const ModelSpec g3 = spec_of("gemma3-tiny");
  ASSERT_EQ(g3.ropes.size(), 2u);
  EXPECT_EQ(g3.layers[0].attn.window, 5);
  EXPECT_EQ(g3.layers[0].attn.rope, 1);
  EXPECT_EQ(g3.layers[2].attn.window, 0);
  EXPECT_EQ(g3.layers[2].attn.rope, 0);
  EXPECT_EQ(g3.ropes[0].type, "linear");
  EXPECT_EQ(g3.ropes[1].theta, 10000.0);
  // No window where the config has none (or has one but does not use it).
  for (const char* m : {"qwen3-tiny", "qwen2-tiny", "llama-tiny", "phi3-tiny", "qwen3-moe-tiny"})
    for (const auto& l : spec_of(m).layers) EXPECT_EQ(l.attn.window, 0) << m;
  // Without layer_types, Gemma 2's default pattern: even layers slide.
  nlohmann::json j = base_config("gemma2-tiny");
  j.erase("layer_types");
  const ModelSpec d = model_spec(parse_model_config(j, "config.json"));
  EXPECT_EQ(d.layers[0].attn.window, 5);
  EXPECT_EQ(d.layers[1].attn.window, 0);
  EXPECT_EQ(d.layers[2].attn.window, 5);
}

TEST(Arch, GemmaScalesSoftCapsAndNorms) {
  const ModelSpec g2 = spec_of("gemma2-tiny");
  EXPECT_EQ(g2.norm, NormKind::RmsOffset);
  EXPECT_TRUE(g2.embed_scale);
  EXPECT_EQ(g2.layers[0].attn.scaling, float(std::pow(24.0, -0.5)));  // query_pre_attn_scalar
  ASSERT_TRUE(g2.layers[0].attn.softcap);
  EXPECT_EQ(*g2.layers[0].attn.softcap, 5.0f);
  ASSERT_TRUE(g2.final_softcap);
  EXPECT_EQ(*g2.final_softcap, 3.0f);
  EXPECT_EQ(g2.layers[0].mlp.act, Activation::GeluTanh);
  EXPECT_EQ(g2.layers[0].names.attn_out_norm, "model.layers.0.post_attention_layernorm");
  EXPECT_EQ(g2.layers[0].names.mlp_in_norm, "model.layers.0.pre_feedforward_layernorm");
  // Llama-style: post_attention_layernorm is the MLP's input norm, nothing after the blocks.
  const ModelSpec q = spec_of("qwen3-tiny");
  EXPECT_EQ(q.layers[0].names.mlp_in_norm, "model.layers.0.post_attention_layernorm");
  EXPECT_TRUE(q.layers[0].names.attn_out_norm.empty());
  EXPECT_EQ(q.layers[0].attn.scaling, float(std::pow(32.0, -0.5)));
}

TEST(Arch, ExpertsFusedProjectionsAndPartialRotary) {
  const ModelSpec m = spec_of("qwen3-moe-tiny");  // mlp_only_layers: [1]
  EXPECT_TRUE(m.layers[0].mlp.moe);
  EXPECT_FALSE(m.layers[1].mlp.moe);
  EXPECT_EQ(m.layers[1].mlp.intermediate, 96);
  EXPECT_EQ(m.layers[0].mlp.intermediate, 32);
  EXPECT_EQ(m.layers[0].mlp.experts, 8);
  EXPECT_EQ(m.layers[0].mlp.top_k, 2);
  EXPECT_TRUE(m.layers[0].mlp.norm_topk);
  EXPECT_TRUE(m.layers[0].mlp.router_in_dtype);
  EXPECT_EQ(m.layers[0].names.expert(3, m.layers[0].names.expert_down),
            "model.layers.0.mlp.experts.3.down_proj");
  const ModelSpec x = spec_of("mixtral-tiny");
  EXPECT_FALSE(x.layers[0].mlp.router_in_dtype);
  EXPECT_TRUE(x.layers[0].mlp.norm_topk);
  EXPECT_EQ(x.layers[0].names.expert(0, x.layers[0].names.expert_gate),
            "model.layers.0.block_sparse_moe.experts.0.w1");
  EXPECT_EQ(spec_of("qwen2-moe-tiny").layers[0].mlp.shared_intermediate, 48);
  const ModelSpec p = spec_of("phi3-tiny");
  EXPECT_TRUE(p.layers[0].attn.fused_qkv);
  EXPECT_EQ(p.layers[0].names.qkv_proj, "model.layers.0.self_attn.qkv_proj");
  EXPECT_EQ(p.layers[0].attn.rotary_dim, 16);
  EXPECT_EQ(spec_of("phi4-tiny-partial").layers[0].attn.rotary_dim, 8);
}

TEST(Arch, WhatTheEngineDoesNotComputeIsRefusedNamingKeyAndValue) {
  nlohmann::json j = base_config("gemma3-tiny");
  j["use_bidirectional_attention"] = true;
  EXPECT_NE(error_of(j).find("use_bidirectional_attention"), std::string::npos) << error_of(j);

  j = base_config("gemma2-tiny");
  j["hidden_activation"] = "relu2";
  EXPECT_NE(error_of(j).find("\"relu2\""), std::string::npos) << error_of(j);

  j = base_config("gemma2-tiny");
  j["layer_types"][1] = "chunked_attention";
  EXPECT_NE(error_of(j).find("chunked_attention"), std::string::npos) << error_of(j);

  j = base_config("qwen3-tiny");
  j["rope_parameters"]["partial_rotary_factor"] = 0.5;
  EXPECT_NE(error_of(j).find("partial_rotary_factor"), std::string::npos) << error_of(j);

  j = base_config("llama-tiny");
  j["attn_logit_softcapping"] = 30.0;
  EXPECT_NE(error_of(j).find("attn_logit_softcapping"), std::string::npos) << error_of(j);

  j = base_config("mistral-tiny");
  j["num_local_experts"] = 4;
  j["num_experts_per_tok"] = 2;
  EXPECT_NE(error_of(j).find("num_experts"), std::string::npos) << error_of(j);

  // An unknown RoPE type fails when the tables are made, naming it.
  j = base_config("mistral-tiny");
  j["rope_parameters"]["rope_type"] = "ntk-by-parts";
  const ModelConfig c = parse_model_config(j, "config.json");
  try {
    (void)rope_tables(c, c.rope, c.head_dim, 4, DType::F32);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("ntk-by-parts"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nanscope
