// Checkpoint directories: both config spellings, shards, and every way the directory can be
// unusable (each must be an InputError naming the file).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "cli_util.hpp"
#include "formats/checkpoint.hpp"
#include "synthetic_model.hpp"

using namespace nanscope;
using namespace nanscope::testing;
using ::testing::HasSubstr;

namespace {
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}
}  // namespace

TEST(Checkpoint, ReadsBothConfigSpellings) {
  auto cfg = tiny_qwen3_config();
  ModelConfig a = parse_model_config(cfg, "new");
  EXPECT_EQ(a.dtype, DType::BF16);
  EXPECT_EQ(a.rope.theta, 10000.0);
  EXPECT_EQ(a.head_dim, 8);
  EXPECT_TRUE(a.tie_word_embeddings);

  cfg.erase("dtype");
  cfg.erase("rope_parameters");
  cfg["torch_dtype"] = "float16";
  cfg["rope_theta"] = 1000000.0;
  cfg["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  ModelConfig b = parse_model_config(cfg, "old");
  EXPECT_EQ(b.dtype, DType::F16);
  EXPECT_EQ(b.rope.theta, 1000000.0);
  EXPECT_EQ(b.rope.type, "linear");
  EXPECT_EQ(b.rope.factor, 2.0);
}

TEST(Checkpoint, HeadDimDefaultsToHiddenOverHeads) {
  auto cfg = tiny_qwen3_config();
  cfg.erase("head_dim");
  EXPECT_EQ(parse_model_config(cfg, "c").head_dim, 8);
}

TEST(Checkpoint, OpensSingleFileAndFindsTensors) {
  TempDir d;
  auto cfg = tiny_qwen3_config();
  write_model(d.path, cfg, expected_planted(cfg, DType::BF16));
  Checkpoint ck = Checkpoint::open(d.path);
  EXPECT_FALSE(ck.sharded());
  EXPECT_TRUE(ck.find("model.layers.1.mlp.down_proj.weight").has_value());
  EXPECT_EQ(ck.storage_dtype(), DType::BF16);
  EXPECT_THAT(error_of([&] { ck.get("lm_head.weight"); }), HasSubstr("lm_head.weight is missing"));
}

TEST(Checkpoint, OpensShardsThroughTheIndex) {
  TempDir d;
  auto cfg = tiny_qwen3_config();
  auto all = expected_planted(cfg, DType::BF16);
  std::vector<PlantedTensor> a(all.begin(), all.begin() + 5), b(all.begin() + 5, all.end());
  write_json(d.path / "config.json", cfg);
  write_tensors(d.path / "model-00001-of-00002.safetensors", a);
  write_tensors(d.path / "model-00002-of-00002.safetensors", b);
  nlohmann::json wm;
  for (const auto& t : a) wm[t.name] = "model-00001-of-00002.safetensors";
  for (const auto& t : b) wm[t.name] = "model-00002-of-00002.safetensors";
  write_json(d.path / "model.safetensors.index.json",
             {{"metadata", {{"total_size", 1}}}, {"weight_map", wm}});
  Checkpoint ck = Checkpoint::open(d.path);
  EXPECT_TRUE(ck.sharded());
  EXPECT_EQ(ck.files().size(), 2u);
  EXPECT_EQ(ck.tensors().size(), all.size());

  // A shard the index names is missing: the error names the index and the shard.
  std::filesystem::remove(d.path / "model-00002-of-00002.safetensors");
  auto msg = error_of([&] { Checkpoint::open(d.path); });
  EXPECT_THAT(msg, HasSubstr("model.safetensors.index.json"));
  EXPECT_THAT(msg, HasSubstr("model-00002-of-00002.safetensors"));
  EXPECT_THAT(msg, HasSubstr("missing"));
}

TEST(Checkpoint, IndexNamingATensorItsShardLacks) {
  TempDir d;
  auto cfg = tiny_qwen3_config();
  auto all = expected_planted(cfg, DType::BF16);
  write_json(d.path / "config.json", cfg);
  write_tensors(d.path / "model-00001-of-00001.safetensors", all);
  nlohmann::json wm;
  for (const auto& t : all) wm[t.name] = "model-00001-of-00001.safetensors";
  wm["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00001.safetensors";
  write_json(d.path / "model.safetensors.index.json", {{"weight_map", wm}});
  auto msg = error_of([&] { Checkpoint::open(d.path); });
  EXPECT_THAT(msg, HasSubstr("model.layers.9.mlp.up_proj.weight"));
  EXPECT_THAT(msg, HasSubstr("model-00001-of-00001.safetensors"));
}

TEST(BadInput, ConfigNotJson) {
  TempDir d;
  std::ofstream(d.path / "config.json") << "{ not json";
  auto msg = error_of([&] { Checkpoint::open(d.path); });
  EXPECT_THAT(msg, HasSubstr("config.json"));
  EXPECT_THAT(msg, HasSubstr("not valid JSON"));
}

TEST(BadInput, DirectoryWithoutWeights) {
  TempDir d;
  write_json(d.path / "config.json", tiny_qwen3_config());
  EXPECT_THAT(error_of([&] { Checkpoint::open(d.path); }), HasSubstr("no model.safetensors"));
}

TEST(BadInput, NotADirectory) {
  EXPECT_THAT(error_of([&] { Checkpoint::open("/nonexistent/model"); }),
              HasSubstr("/nonexistent/model"));
}

TEST(BadInput, ConfigMissingAField) {
  auto cfg = tiny_qwen3_config();
  cfg.erase("hidden_size");
  EXPECT_THAT(error_of([&] { parse_model_config(cfg, "x/config.json"); }),
              HasSubstr("x/config.json: `hidden_size` is missing"));
  cfg = tiny_qwen3_config();
  cfg["num_key_value_heads"] = 3;
  EXPECT_THAT(error_of([&] { parse_model_config(cfg, "c"); }), HasSubstr("multiple"));
}

TEST(BadInput, UnknownArchitectureNamesIt) {
  TempDir d;
  auto cfg = tiny_qwen3_config();
  write_model(d.path, cfg, expected_planted(cfg, DType::BF16));
  cfg["model_type"] = "mamba";
  write_json(d.path / "config.json", cfg);
  auto r = run_cli({"scan", d.path.string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("mamba"));
  EXPECT_THAT(r.err, HasSubstr("qwen3"));
}
