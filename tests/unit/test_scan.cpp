// `nanscope scan`: findings on planted damage, the JSON contract, exit codes, and the damaged
// checkpoints made with transformers/peft (tests/fixtures/models).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "cli_util.hpp"
#include "synthetic_model.hpp"
#include "tools/scan.hpp"

using namespace nanscope;
using namespace nanscope::testing;
using ::testing::HasSubstr;

namespace {

const Finding* find_kind(const ScanResult& r, const std::string& kind, const std::string& tensor) {
  for (const auto& f : r.findings)
    if (finding_kind_name(f.kind) == kind && f.tensor == tensor) return &f;
  return nullptr;
}

std::vector<PlantedTensor> with_values(std::vector<PlantedTensor> ts, const std::string& name,
                                       std::function<void(std::vector<float>&)> edit) {
  for (auto& t : ts)
    if (t.name == name) {
      size_t n = 1;
      for (auto d : t.shape) n *= size_t(d);
      t.values.assign(n, 0.5f);
      edit(t.values);
    }
  return ts;
}

}  // namespace

TEST(Scan, HealthyModelHasNoFindings) {
  TempDir d;
  auto cfg = tiny_qwen3_config();
  write_model(d.path, cfg, expected_planted(cfg, DType::BF16));
  ScanResult r = scan(d.path, {});
  EXPECT_TRUE(r.findings.empty()) << scan_to_text(r);
  EXPECT_EQ(r.tensors, expected_planted(cfg, DType::BF16).size());
  auto cli = run_cli({"scan", d.path.string(), "--json"});
  EXPECT_EQ(cli.exit_code, 0) << cli.err;
  auto j = cli.json();
  EXPECT_EQ(j["tensors"], r.tensors);
  EXPECT_EQ(j["bytes"], r.bytes);
  EXPECT_TRUE(j["findings"].empty());
}

TEST(Scan, CountsNonFiniteElementsPerTensor) {
  TempDir d;
  auto cfg = tiny_qwen3_config();
  const std::string name = "model.layers.1.self_attn.v_proj.weight";
  write_model(d.path, cfg, with_values(expected_planted(cfg, DType::BF16), name, [](auto& v) {
                v[0] = NAN;
                v[3] = INFINITY;
                v[7] = -INFINITY;
              }));
  ScanResult r = scan(d.path, {});
  const Finding* f = find_kind(r, "nonfinite", name);
  ASSERT_NE(f, nullptr) << scan_to_text(r);
  EXPECT_EQ(f->count, 3u);
  EXPECT_EQ(f->severity, Severity::Error);
  auto cli = run_cli({"scan", d.path.string(), "--json"});
  EXPECT_EQ(cli.exit_code, 1);
  auto j = cli.json();
  ASSERT_EQ(j["findings"].size(), 1u);
  EXPECT_EQ(j["findings"][0]["kind"], "nonfinite");
  EXPECT_EQ(j["findings"][0]["tensor"], name);
  EXPECT_EQ(j["findings"][0]["count"], 3);
  // Human output names the tensor too, and says FAIL.
  auto text = run_cli({"scan", d.path.string()});
  EXPECT_EQ(text.exit_code, 1);
  EXPECT_THAT(text.out, HasSubstr(name));
  EXPECT_THAT(text.out, HasSubstr("FAIL"));
}

TEST(Scan, Fp16RangeIsAWarning) {
  TempDir d;
  auto cfg = tiny_qwen3_config();
  const std::string name = "model.layers.0.mlp.down_proj.weight";
  write_model(d.path, cfg, with_values(expected_planted(cfg, DType::F32), name, [](auto& v) {
                v[1] = 70000.0f;
                v[2] = -1e6f;
              }));
  ScanResult r = scan(d.path, {});
  const Finding* f = find_kind(r, "fp16_range", name);
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->severity, Severity::Warning);
  EXPECT_EQ(f->count, 2u);
  EXPECT_FALSE(r.has_error());
  EXPECT_EQ(run_cli({"scan", d.path.string()}).exit_code, 0);
}

TEST(Scan, StructureFindings) {
  TempDir d;
  auto cfg = tiny_qwen3_config();
  auto ts = expected_planted(cfg, DType::BF16);
  std::vector<PlantedTensor> edited;
  for (auto t : ts) {
    if (t.name == "model.layers.1.self_attn.k_norm.weight") continue;       // missing
    if (t.name == "model.layers.0.mlp.up_proj.weight") t.shape = {31, 16};  // misshapen
    if (t.name == "model.layers.0.self_attn.q_proj.weight")
      t.name = "model.layers.0.self_attn.q_proj.base_layer.weight";  // PEFT wrapping
    edited.push_back(t);
  }
  edited.push_back(
      {"model.layers.0.self_attn.q_proj.lora_A.default.weight", DType::F32, {4, 16}, {}});
  edited.push_back({"model.extra.weight", DType::F32, {2}, {}});
  write_model(d.path, cfg, edited);
  ScanResult r = scan(d.path, {});
  EXPECT_NE(find_kind(r, "missing_tensor", "model.layers.1.self_attn.k_norm.weight"), nullptr);
  EXPECT_NE(find_kind(r, "shape_mismatch", "model.layers.0.mlp.up_proj.weight"), nullptr);
  EXPECT_NE(find_kind(r, "adapter_keys", "model.layers.0.self_attn.q_proj.base_layer.weight"),
            nullptr);
  EXPECT_NE(find_kind(r, "adapter_keys", "model.layers.0.self_attn.q_proj.lora_A.default.weight"),
            nullptr);
  // The PEFT-wrapped weight is not also reported as missing.
  EXPECT_EQ(find_kind(r, "missing_tensor", "model.layers.0.self_attn.q_proj.weight"), nullptr);
  const Finding* u = find_kind(r, "unexpected_tensor", "model.extra.weight");
  ASSERT_NE(u, nullptr);
  EXPECT_EQ(u->severity, Severity::Warning);
  EXPECT_EQ(run_cli({"scan", d.path.string()}).exit_code, 1);
}

TEST(Scan, TiedEmbeddingsDisagreement) {
  TempDir d;
  auto cfg = tiny_qwen3_config();  // tied
  auto ts = expected_planted(cfg, DType::BF16);
  ts.push_back({"lm_head.weight", DType::BF16, {32, 16}, std::vector<float>(32 * 16, 0.25f)});
  write_model(d.path, cfg, ts);
  ScanResult r = scan(d.path, {});
  const Finding* f = find_kind(r, "tied_embeddings", "lm_head.weight");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->severity, Severity::Error);

  // Untied config without lm_head.
  TempDir d2;
  cfg["tie_word_embeddings"] = false;
  write_model(d2.path, cfg, expected_planted(tiny_qwen3_config(), DType::BF16));
  ScanResult r2 = scan(d2.path, {});
  ASSERT_NE(find_kind(r2, "tied_embeddings", "lm_head.weight"), nullptr) << scan_to_text(r2);
}

TEST(Scan, MemoryStaysFlatOnRepeatedScans) {
  // The scan of a model releases the pages it read: scanning many times must not grow RSS by
  // the model size each time (a leak of mappings would).
  TempDir d;
  auto cfg = tiny_qwen3_config();
  write_model(d.path, cfg, expected_planted(cfg, DType::F32));
  for (int i = 0; i < 50; ++i) ASSERT_FALSE(scan(d.path, {}).has_error());
}

// ---- fixtures made by transformers / peft (tools/fixtures/make_models.py) --------------------

TEST(ScanFixtures, DamagedCheckpointsFromTheRealLibraries) {
  const std::string models = fixture("models");
  ASSERT_TRUE(std::filesystem::exists(models + "/qwen3-tiny"))
      << "fixtures missing: run tools/fixtures/run_all.sh on the oracle machine";
  EXPECT_FALSE(scan(models + "/qwen3-tiny", {}).has_error());
  EXPECT_FALSE(scan(models + "/qwen3-tiny-sharded", {}).has_error());
  EXPECT_FALSE(scan(models + "/qwen2-tiny", {}).has_error());
  EXPECT_FALSE(scan(models + "/llama-tiny", {}).has_error());

  ScanResult nan = scan(models + "/qwen3-nan", {});
  const Finding* f = find_kind(nan, "nonfinite", "model.layers.1.mlp.down_proj.weight");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->count, 2u);

  ScanResult rows = scan(models + "/qwen3-embrows", {});
  f = find_kind(rows, "nonfinite", "model.embed_tokens.weight");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->count, 64u + 1u);  // row 5 whole (hidden 64) + one element of row 17

  ScanResult missing = scan(models + "/qwen3-missing", {});
  EXPECT_NE(find_kind(missing, "missing_tensor", "model.layers.1.self_attn.k_proj.weight"),
            nullptr);

  ScanResult peftkeys = scan(models + "/qwen3-peftkeys", {});
  EXPECT_TRUE(peftkeys.has_error());
  size_t adapter_keys = 0;
  for (const auto& x : peftkeys.findings) adapter_keys += x.kind == FindingKind::AdapterKeys;
  EXPECT_GT(adapter_keys, 10u);
  EXPECT_EQ(find_kind(peftkeys, "missing_tensor", "model.layers.0.self_attn.q_proj.weight"),
            nullptr);

  // The fp16-overflow models are finite and within bf16 range; their danger is in activations.
  EXPECT_FALSE(scan(models + "/qwen3-fp16-mlp", {}).has_error());

  // A truncated shard is unusable input: exit 2, naming the shard.
  auto cli = run_cli({"scan", models + "/qwen3-truncated"});
  EXPECT_EQ(cli.exit_code, 2);
  EXPECT_THAT(cli.err, HasSubstr("qwen3-truncated/model-"));

  // The README example: merged from a poisoned adapter.
  auto ex = run_cli({"scan", models + "/qwen3-example", "--json"});
  EXPECT_EQ(ex.exit_code, 1);
  EXPECT_EQ(ex.json()["findings"][0]["kind"], "nonfinite");
  EXPECT_EQ(ex.json()["findings"][0]["tensor"], "model.layers.0.self_attn.q_proj.weight");
}

TEST(ScanFixtures, AdapterTensorsAreScannedToo) {
  const std::string base = fixture("models/qwen3-example-base");
  const std::string adapter = fixture("adapters/example-poisoned");
  ASSERT_TRUE(std::filesystem::exists(adapter)) << "fixtures missing";
  ScanResult r = scan(base, ScanOptions{adapter, 0});
  bool found = false;
  for (const auto& f : r.findings)
    if (f.kind == FindingKind::Nonfinite && f.source == "adapter" &&
        f.tensor.find("layers.0.self_attn.q_proj.lora_B") != std::string::npos)
      found = true;
  EXPECT_TRUE(found) << scan_to_text(r);
  EXPECT_EQ(run_cli({"scan", base, "--adapter", adapter}).exit_code, 1);
  EXPECT_EQ(run_cli({"scan", base, "--adapter", "/nonexistent/adapter"}).exit_code, 2);
}
