// adapter_config.json as peft 0.21 reads it: patterns (first match in file order), rsLoRA,
// targeting, and every config nanscope refuses (each an InputError naming the field or file).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/error.hpp"
#include "formats/adapter.hpp"

using namespace nanscope;
namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

ojson base_config() {
  return ojson::parse(R"({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"], "use_rslora": false, "use_dora": false,
    "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "task_type": "CAUSAL_LM",
    "megatron_config": null, "use_qalora": false, "layer_replication": null,
    "init_lora_weights": true, "loftq_config": {}})");
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}

struct Dir {
  fs::path path;
  Dir() {
    static int n = 0;
    path = fs::temp_directory_path() /
           ("nanscope-adapter-test-" + std::to_string(::getpid()) + "-" + std::to_string(n++));
    fs::create_directories(path);
  }
  ~Dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  void write(const std::string& f, const std::string& s) const { std::ofstream(path / f) << s; }
};

}  // namespace

TEST(AdapterConfig, ParsesTheCommonFields) {
  AdapterConfig c = parse_adapter_config(base_config(), "cfg");
  EXPECT_EQ(c.r, 8);
  EXPECT_EQ(c.lora_alpha, 16);
  EXPECT_EQ(c.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_FALSE(c.target_modules_regex);
  LoraScale s = lora_scale_for(c, "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(s.r, 8);
  EXPECT_EQ(s.scale, 2.0);
}

TEST(AdapterConfig, RsLoraScalesBySqrtR) {
  auto j = base_config();
  j["use_rslora"] = true;
  j["r"] = 4;
  j["lora_alpha"] = 8;
  EXPECT_EQ(lora_scale_for(parse_adapter_config(j, "c"), "x.q_proj").scale, 4.0);
}

TEST(AdapterConfig, PatternsFirstMatchInFileOrderWins) {
  // Both keys match layers.1...q_proj; the first in the FILE wins, not the alphabetically first.
  auto j = base_config();
  j["rank_pattern"] = ojson::parse(R"({"q_proj": 4, "layers.1.self_attn.q_proj": 2})");
  j["alpha_pattern"] = ojson::parse(R"({"v_proj": 32, "layers.2.self_attn.o_proj": 4})");
  AdapterConfig c = parse_adapter_config(j, "c");
  EXPECT_EQ(lora_scale_for(c, "model.layers.1.self_attn.q_proj").r, 4);
  auto j2 = base_config();
  j2["rank_pattern"] = ojson::parse(R"({"layers.1.self_attn.q_proj": 2, "q_proj": 4})");
  EXPECT_EQ(lora_scale_for(parse_adapter_config(j2, "c"), "model.layers.1.self_attn.q_proj").r, 2);
  // Alpha from alpha_pattern, rank from r.
  LoraScale v = lora_scale_for(c, "model.layers.0.self_attn.v_proj");
  EXPECT_EQ(v.r, 8);
  EXPECT_EQ(v.alpha, 32);
  EXPECT_EQ(v.scale, 4.0);
  LoraScale o = lora_scale_for(c, "model.layers.2.self_attn.o_proj");
  EXPECT_EQ(o.scale, 0.5);
  // A key matches at a module-name boundary only: "proj" does not match "q_proj" via (.*\.)?
  auto j3 = base_config();
  j3["rank_pattern"] = ojson::parse(R"({"proj": 2})");
  EXPECT_EQ(lora_scale_for(parse_adapter_config(j3, "c"), "model.layers.0.self_attn.q_proj").r, 8);
  // ...but a key is a regex: "^model.layers.0.*" style keys work as in peft's docs.
  auto j4 = base_config();
  j4["rank_pattern"] = ojson::parse(R"({"model\\.layers\\.0\\..*": 2})");
  EXPECT_EQ(lora_scale_for(parse_adapter_config(j4, "c"), "model.layers.0.self_attn.q_proj").r, 2);
  EXPECT_EQ(lora_scale_for(parse_adapter_config(j4, "c"), "model.layers.1.self_attn.q_proj").r, 8);
}

TEST(AdapterConfig, TargetingAsPeftDoes) {
  auto j = base_config();
  AdapterConfig c = parse_adapter_config(j, "c");
  EXPECT_TRUE(is_targeted(c, "model.layers.0.self_attn.q_proj"));
  EXPECT_FALSE(is_targeted(c, "model.layers.0.self_attn.k_proj"));
  EXPECT_FALSE(is_targeted(c, "model.layers.0.self_attn.xq_proj"));  // suffix at a dot only
  j["layers_to_transform"] = 1;                                      // an int
  c = parse_adapter_config(j, "c");
  ASSERT_TRUE(c.layers_to_transform);
  EXPECT_EQ(*c.layers_to_transform, std::vector<int64_t>{1});
  EXPECT_FALSE(is_targeted(c, "model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(is_targeted(c, "model.layers.1.self_attn.q_proj"));
  j["layers_to_transform"] = ojson::array({0, 2});
  j["layers_pattern"] = "layers";
  c = parse_adapter_config(j, "c");
  EXPECT_TRUE(is_targeted(c, "model.layers.2.self_attn.v_proj"));
  EXPECT_FALSE(is_targeted(c, "model.layers.1.self_attn.v_proj"));
  auto r = base_config();
  r["target_modules"] = R"(model\.layers\.[01]\.(self_attn\.(q|v)_proj|mlp\.up_proj))";
  c = parse_adapter_config(r, "c");
  ASSERT_TRUE(c.target_modules_regex);
  EXPECT_TRUE(is_targeted(c, "model.layers.1.mlp.up_proj"));
  EXPECT_FALSE(is_targeted(c, "model.layers.2.mlp.up_proj"));
  EXPECT_FALSE(is_targeted(c, "model.layers.1.mlp.up_proj.x"));  // full match
  auto m = base_config();
  m["modules_to_save"] = ojson::array({"lm_head"});
  m["target_modules"] = ojson::array({"lm_head", "q_proj"});
  EXPECT_FALSE(is_targeted(parse_adapter_config(m, "c"), "lm_head"));
  auto e = base_config();
  e["exclude_modules"] = ojson::array({"layers.0.self_attn.q_proj"});
  EXPECT_FALSE(is_targeted(parse_adapter_config(e, "c"), "model.layers.0.self_attn.q_proj"));
}

TEST(AdapterConfig, TrainableTokensListOrDict) {
  auto j = base_config();
  j["trainable_token_indices"] = ojson::array({1, 2, 3});
  EXPECT_EQ(parse_adapter_config(j, "c").trainable_token_indices.at(""),
            (std::vector<int64_t>{1, 2, 3}));
  j["trainable_token_indices"] = ojson::parse(R"({"embed_tokens": [5]})");
  EXPECT_EQ(parse_adapter_config(j, "c").trainable_token_indices.at("embed_tokens"),
            std::vector<int64_t>{5});
}

TEST(AdapterConfig, RefusesWhatItCannotHonourNamingTheField) {
  auto j = base_config();
  j["peft_type"] = "IA3";
  EXPECT_NE(error_of([&] { parse_adapter_config(j, "cfg.json"); }).find("IA3"), std::string::npos);
  struct Bad {
    const char* field;
    ojson value;
  };
  const Bad bad[] = {{"use_qalora", true},
                     {"megatron_config", ojson::parse(R"({"tp": 2})")},
                     {"alora_invocation_tokens", ojson::array({1, 2})},
                     {"layer_replication", ojson::parse("[[0, 2]]")},
                     {"target_parameters", ojson::array({"experts.down_proj"})},
                     {"velora_config", ojson::parse(R"({"a": 1})")},
                     {"some_future_field", 3}};
  for (const auto& b : bad) {
    auto k = base_config();
    k[b.field] = b.value;
    const std::string e = error_of([&] { parse_adapter_config(k, "cfg.json"); });
    EXPECT_NE(e.find(b.field), std::string::npos) << e;
    EXPECT_NE(e.find("cfg.json"), std::string::npos) << e;
  }
  auto l = base_config();
  l["init_lora_weights"] = "loftq";
  EXPECT_NE(error_of([&] { parse_adapter_config(l, "c"); }).find("loftq"), std::string::npos);
  auto p = base_config();
  p["init_lora_weights"] = "pissa";
  EXPECT_NE(error_of([&] { parse_adapter_config(p, "c"); }).find("path_initial_model"),
            std::string::npos);
  auto b = base_config();
  b["bias"] = "some";
  EXPECT_NE(error_of([&] { parse_adapter_config(b, "c"); }).find("bias"), std::string::npos);
  auto t = base_config();
  t["target_modules"] = ".*q_proj";
  t["layers_to_transform"] = 1;
  EXPECT_NE(error_of([&] { parse_adapter_config(t, "c"); }).find("layers_to_transform"),
            std::string::npos);
  // Harmless fields at non-default values are accepted.
  auto h = base_config();
  h["lora_dropout"] = 0.1;
  h["inference_mode"] = true;
  h["init_lora_weights"] = "gaussian";
  EXPECT_NO_THROW(parse_adapter_config(h, "c"));
}

TEST(AdapterOpen, MissingFilesAreNamed) {
  Dir d;
  EXPECT_NE(error_of([&] { Adapter::open(d.path / "nope"); }).find("no such file or directory"),
            std::string::npos);
  EXPECT_NE(error_of([&] { Adapter::open(d.path); }).find("adapter_config.json"),
            std::string::npos);
  d.write("adapter_config.json", base_config().dump());
  EXPECT_NE(error_of([&] { Adapter::open(d.path); }).find("adapter_model.safetensors is missing"),
            std::string::npos);
  d.write("adapter_model.bin", "pickle");
  const std::string e = error_of([&] { Adapter::open(d.path); });
  EXPECT_NE(e.find("adapter_model.bin"), std::string::npos) << e;
  EXPECT_NE(e.find("save_file"), std::string::npos) << e;
  EXPECT_NE(e.find("safe_serialization=True"), std::string::npos) << e;
  d.write("adapter_config.json", "{not json");
  EXPECT_NE(error_of([&] { Adapter::open(d.path); }).find("not valid JSON"), std::string::npos);
}

TEST(AdapterOpen, ReadsARealPeftAdapterIfPresent) {
  const fs::path p = fs::path(NANSCOPE_FIXTURES) / "adapters" / "patterns";
  if (!fs::exists(p / "adapter_config.json")) {
    GTEST_SKIP() << "no peft-made adapter in fixtures yet (make_merge_goldens.py); covered by "
                    "test_merge";
  }
  Adapter a = Adapter::open(p);
  EXPECT_EQ(a.config().rank_pattern.size(), 2u);
  // peft writes the config with sort_keys=True, so file order is sorted order; kept as read.
  EXPECT_EQ(a.config().rank_pattern[0].first, "model.layers.1.mlp.down_proj");
}
