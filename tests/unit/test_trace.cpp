// trace(): the first non-finite site and its fp32 value on the planted fixtures, the --save
// layout, and the JSON / text renderings.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "formats/safetensors.hpp"
#include "tools/trace.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;

const fs::path kModels = fs::path(NANSCOPE_FIXTURES) / "models";
const fs::path kGoldens = std::getenv("NANSCOPE_TRACE_GOLDENS")
                              ? fs::path(std::getenv("NANSCOPE_TRACE_GOLDENS"))
                              : fs::path(NANSCOPE_FIXTURES) / "goldens" / "trace";
const std::vector<int64_t> kIds = {1, 15, 300, 7, 42, 999, 3, 12};

TraceResult run(const std::string& model, DType dt, AttentionProfile att,
                std::optional<fs::path> save = std::nullopt) {
  const Checkpoint ck = Checkpoint::open(kModels / model);
  TraceOptions opt;
  opt.ids = kIds;
  opt.dtype = dt;
  opt.attention = att;
  opt.save = save;
  return trace(ck, opt);
}

TEST(Trace, Fp16EagerScoresOverflowButNotUnderFused) {
  TraceResult r = run("qwen3-fp16-attn", DType::F16, AttentionProfile::Eager);
  ASSERT_TRUE(r.first_nonfinite);
  const FirstNonfinite& f = *r.first_nonfinite;
  EXPECT_EQ(f.site, "model.layers." + std::to_string(f.layer) + ".self_attn.scores");
  EXPECT_TRUE(f.finite_in_fp32);
  ASSERT_TRUE(f.value_fp32);
  EXPECT_GT(*f.value_fp32, 65504.0) << "q.k^T in fp32 should be beyond fp16's range";
  EXPECT_FALSE(r.finite());
  // SDPA-style attention keeps the scores in fp32: no overflow; bf16 eager has the range.
  EXPECT_TRUE(run("qwen3-fp16-attn", DType::F16, AttentionProfile::Fused).finite());
  EXPECT_TRUE(run("qwen3-fp16-attn", DType::BF16, AttentionProfile::Eager).finite());
}

TEST(Trace, Fp16MlpOverflowAtTheFirstSiteTransformersHooksShow) {
  TraceResult r = run("qwen3-fp16-mlp", DType::F16, AttentionProfile::Eager);
  ASSERT_TRUE(r.first_nonfinite);
  const FirstNonfinite& f = *r.first_nonfinite;
  EXPECT_EQ(f.layer, 1);
  EXPECT_EQ(f.site, "model.layers.1.mlp.down_proj");
  ASSERT_TRUE(f.value_fp32);
  EXPECT_GT(*f.value_fp32, 65504.0);
  EXPECT_TRUE(run("qwen3-fp16-mlp", DType::BF16, AttentionProfile::Eager).finite());

  // transformers' forward hooks agree: no module before layer 1's down_proj is non-finite.
  const fs::path g = kGoldens / "qwen3-fp16-mlp__float16__eager__sites.safetensors";
  ASSERT_TRUE(fs::exists(g)) << g << " is missing; run tools/fixtures/make_trace_goldens.py";
  auto file = SafetensorsFile::open(g);
  auto nonfinite = [&](const std::string& name) {
    const TensorInfo* t = file->find(name);
    if (!t) return false;
    std::vector<float> v(size_t(t->numel()));
    load_to_f32(file->data(*t).data(), t->dtype, v.data(), v.size());
    for (float x : v)
      if (!std::isfinite(x)) return true;
    return false;
  };
  EXPECT_TRUE(nonfinite("model.layers.1.mlp.down_proj"));
  for (const char* m :
       {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.act_fn",
        "model.layers.1.post_attention_layernorm", "model.layers.1.self_attn", "model.layers.0"})
    EXPECT_FALSE(nonfinite(m)) << m;
}

TEST(Trace, PlantedNaNIsFoundInEveryDtypeAndProfile) {
  for (DType dt : {DType::F32, DType::BF16, DType::F16})
    for (AttentionProfile a : {AttentionProfile::Eager, AttentionProfile::Fused}) {
      TraceResult r = run("qwen3-nan", dt, a);
      ASSERT_TRUE(r.first_nonfinite) << run_dtype_name(dt);
      EXPECT_EQ(r.first_nonfinite->site, "model.layers.1.mlp.down_proj") << run_dtype_name(dt);
      EXPECT_FALSE(r.first_nonfinite->finite_in_fp32);
      EXPECT_FALSE(r.first_nonfinite->value_fp32);
      EXPECT_TRUE(r.hidden[1].stats.finite());
      EXPECT_FALSE(r.hidden[2].stats.finite());
    }
}

TEST(Trace, SaveWritesTheInterfaceLayout) {
  const fs::path out = fs::temp_directory_path() / "nanscope_trace_save_test.safetensors";
  fs::remove(out);
  TraceResult r = run("qwen3-tiny", DType::BF16, AttentionProfile::Eager, out);
  ASSERT_TRUE(fs::exists(out));
  auto f = SafetensorsFile::open(out);
  const int64_t N = r.layers, T = int64_t(kIds.size());
  for (int64_t i = 0; i <= N; ++i) {
    const TensorInfo* t = f->find("hidden." + std::to_string(i));
    ASSERT_TRUE(t) << i;
    EXPECT_EQ(t->dtype, DType::F32);
    EXPECT_EQ(t->shape, (std::vector<int64_t>{T, r.hidden_size}));
  }
  EXPECT_FALSE(f->find("hidden." + std::to_string(N + 1)));
  const TensorInfo* lg = f->find("logits");
  ASSERT_TRUE(lg);
  EXPECT_EQ(lg->shape, (std::vector<int64_t>{T, r.vocab}));
  const TensorInfo* ids = f->find("input_ids");
  ASSERT_TRUE(ids);
  EXPECT_EQ(ids->dtype, DType::I64);
  std::vector<int64_t> back(kIds.size());
  std::memcpy(back.data(), f->data(*ids).data(), back.size() * 8);
  EXPECT_EQ(back, kIds);
  // The saved states are the ones the statistics describe.
  std::vector<float> h(size_t(T * r.hidden_size));
  const TensorInfo* last = f->find("hidden." + std::to_string(N));
  load_to_f32(f->data(*last).data(), DType::F32, h.data(), h.size());
  EXPECT_EQ(value_stats(h).max, r.hidden[size_t(N)].stats.max);
  fs::remove(out);
}

TEST(Trace, JsonAndTextFollowTheInterface) {
  TraceResult r = run("qwen3-fp16-mlp", DType::F16, AttentionProfile::Eager);
  const nlohmann::json j = trace_json(r);
  EXPECT_EQ(j["dtype"], "fp16");
  EXPECT_EQ(j["attention"], "eager");
  EXPECT_EQ(j["tokens"].size(), kIds.size());
  ASSERT_EQ(j["hidden"].size(), size_t(r.layers + 1));
  for (const char* k : {"index", "finite", "min", "max", "abs_max"})
    EXPECT_TRUE(j["hidden"][0].contains(k)) << k;
  for (const char* k : {"finite", "min", "max"}) EXPECT_TRUE(j["logits"].contains(k)) << k;
  EXPECT_EQ(j["first_nonfinite"]["site"], "model.layers.1.mlp.down_proj");
  EXPECT_EQ(j["first_nonfinite"]["layer"], 1);
  EXPECT_GT(j["first_nonfinite"]["value_fp32"].get<double>(), 65504.0);
  EXPECT_NO_THROW((void)j.dump());  // no NaN / inf numbers in the document

  const std::string text = trace_text(r);
  EXPECT_NE(text.find("Layer 0: [1, 8, 64] min="), std::string::npos) << text;
  EXPECT_NE(text.find("[OK]"), std::string::npos);
  EXPECT_NE(text.find("Logits: [1, 8, 1024]"), std::string::npos) << text;
  EXPECT_NE(text.find("model.layers.1.mlp.down_proj"), std::string::npos);

  TraceResult ok = run("qwen3-tiny", DType::BF16, AttentionProfile::Eager);
  EXPECT_TRUE(ok.finite());
  EXPECT_TRUE(trace_json(ok)["first_nonfinite"].is_null());
  EXPECT_NE(trace_text(ok).find("All finite."), std::string::npos);
}

TEST(Trace, RunDtypeSpellings) {
  EXPECT_EQ(parse_run_dtype("bf16"), DType::BF16);
  EXPECT_EQ(parse_run_dtype("float16"), DType::F16);
  EXPECT_EQ(parse_run_dtype("fp32"), DType::F32);
  EXPECT_FALSE(parse_run_dtype("int8"));
  EXPECT_EQ(run_dtype_name(DType::BF16), "bf16");
}

TEST(Trace, NoTokensIsAnInputError) {
  const Checkpoint ck = Checkpoint::open(kModels / "qwen3-tiny");
  EXPECT_THROW(trace(ck, TraceOptions{}), InputError);
}

}  // namespace
}  // namespace nanscope

namespace nanscope {
namespace {

// Gemma's fp16 story on a new family: the MLP's down_proj passes 65504 in fp16 (its fp32 value
// is named), bf16 is finite; transformers' goldens show the same NaN pattern.
TEST(Trace, Fp16MlpOverflowIsNamedOnGemma) {
  TraceResult r = run("gemma2-fp16-mlp", DType::F16, AttentionProfile::Eager);
  ASSERT_TRUE(r.first_nonfinite);
  EXPECT_EQ(r.first_nonfinite->site, "model.layers.1.mlp.down_proj");
  EXPECT_TRUE(r.first_nonfinite->finite_in_fp32);
  ASSERT_TRUE(r.first_nonfinite->value_fp32);
  EXPECT_GT(*r.first_nonfinite->value_fp32, 65504.0);
  EXPECT_TRUE(run("gemma2-fp16-mlp", DType::BF16, AttentionProfile::Eager).finite());
}

// A mixture of experts reads only the experts its tokens route to.
TEST(Trace, MixtureOfExpertsReadsOnlyRoutedExperts) {
  const Checkpoint ck = Checkpoint::open(kModels / "qwen3-moe-tiny");
  TraceOptions opt;
  opt.ids = {1, 2};
  opt.dtype = DType::BF16;
  const TraceResult r = trace(ck, opt);
  EXPECT_GT(r.weight_bytes, 0u);
  EXPECT_LT(r.weight_bytes, ck.total_bytes());
  // Two tokens route to at most 4 of 8 experts per MoE layer: the rest is never read.
  uint64_t experts = 0;
  for (const auto& [name, t] : ck.tensors())
    if (name.find(".experts.") != std::string::npos) experts += t.bytes().size();
  EXPECT_LE(r.weight_bytes, ck.total_bytes() - experts / 2);
}

}  // namespace
}  // namespace nanscope
