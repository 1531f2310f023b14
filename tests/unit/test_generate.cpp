// Decoding with the key/value cache against transformers' generate(do_sample=False): every run
// of tools/fixtures/make_generate_goldens.py (base, merged and unmerged models, fp32 and bf16,
// eager and sdpa; the trained model's real-text continuations) must give the same token ids
// and stop for the same reason. And the cache itself: a step's logits are those of the whole
// sequence run at once.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_util.hpp"
#include "common/error.hpp"
#include "formats/checkpoint.hpp"
#include "golden_util.hpp"
#include "model/adapter_overlay.hpp"
#include "model/forward.hpp"
#include "tools/compare.hpp"
#include "tools/generate.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;
const fs::path kFx = fs::path(NANSCOPE_FIXTURES);

struct GenCase {
  nlohmann::json run;
  std::string name;
};

std::vector<GenCase> gen_cases() {
  std::ifstream f(kFx / "goldens" / "generate" / "generate.json");
  if (!f) return {{nlohmann::json(), "generate_json_missing"}};
  const auto j = nlohmann::json::parse(f);
  std::vector<GenCase> v;
  for (const auto& r : j.at("runs")) {
    std::string n = r.at("model").get<std::string>();
    if (!r.at("adapter").is_null()) n += "_" + r.at("adapter").get<std::string>();
    n += "_" + r.at("dtype").get<std::string>() + "_" + r.at("attn").get<std::string>() + "_p" +
         std::to_string(r.at("prompt_ids").size());
    std::replace_if(n.begin(), n.end(), [](char c) { return !std::isalnum(static_cast<unsigned char>(c)); }, '_');
    v.push_back({r, n});
  }
  return v;
}

class GenerateGolden : public ::testing::TestWithParam<GenCase> {};

TEST_P(GenerateGolden, TokenIdsMatchTransformersGenerate) {
  const nlohmann::json& r = GetParam().run;
  ASSERT_FALSE(r.is_null()) << "make it with: python3 tools/fixtures/make_generate_goldens.py "
                               "--fixtures tests/fixtures";
  const Checkpoint ck = Checkpoint::open(kFx / r.at("model").get<std::string>());
  GenerateOptions o;
  o.prompt = r.at("prompt_ids").get<std::vector<int64_t>>();
  const auto want = r.at("ids").get<std::vector<int64_t>>();
  o.max_new_tokens = 40;
  o.dtype = dtype_of(r.at("dtype").get<std::string>());
  o.attention = r.at("attn") == "eager" ? AttentionProfile::Eager : AttentionProfile::Fused;
  if (!r.at("adapter").is_null())
    o.adapter = AdapterOverlay::open(kFx / r.at("adapter").get<std::string>(), ck);
  o.keep_logits = true;
  const GenerateResult g = generate(ck, o);
  EXPECT_TRUE(g.finite());
  // Token for token, up to a near-tie: where the two continuations part, the token transformers
  // chose must score within rounding (two units in the last place of the run dtype) of ours --
  // another accumulation order in a product decides such a tie either way. After it the
  // continuations are different texts and are not compared.
  size_t i = 0;
  while (i < g.ids.size() && i < want.size() && g.ids[i] == want[i]) ++i;
  if (i == want.size() && i == g.ids.size()) {
    EXPECT_EQ(g.finish_reason, r.at("finish_reason").get<std::string>());
    return;
  }
  ASSERT_LT(i, g.ids.size()) << "stopped after " << i << " tokens; transformers went on";
  ASSERT_LT(i, want.size()) << "went on after transformers' " << i << " tokens";
  const std::vector<float>& lg = g.step_logits[i];
  const float ours = lg[size_t(g.ids[i])], theirs = lg[size_t(want[i])];
  const double ulp = o.dtype == DType::F32 ? std::ldexp(1.0, -23) : std::ldexp(1.0, -7);
  EXPECT_LE(ours - theirs, 2 * ulp * std::fabs(ours) + 1e-30)
      << "step " << i << ": ours " << g.ids[i] << " (" << ours << ") vs transformers' " << want[i]
      << " (" << theirs << "): not a near-tie";
  std::printf("[ near-tie ] identical for %zu of %zu tokens, then logits %.6g vs %.6g\n", i,
              want.size(), ours, theirs);
}

INSTANTIATE_TEST_SUITE_P(Goldens, GenerateGolden, ::testing::ValuesIn(gen_cases()),
                         [](const auto& p) { return p.param.name; });

// The cache: prompt then one token at a time gives the logits of the whole sequence at once
// (the last row; the same arithmetic up to the row count a kernel sees).
TEST(KvCache, StepsGiveTheLogitsOfTheWholeSequence) {
  for (const char* model : {"qwen3-tiny", "mistral-tiny", "gemma2-tiny", "phi3-tiny"}) {
    const Checkpoint ck = Checkpoint::open(kFx / "models" / model);
    for (AttentionProfile at : {AttentionProfile::Eager, AttentionProfile::Fused}) {
      ForwardOptions fo;
      fo.dtype = DType::F32;
      fo.attention = at;
      fo.release_pages = false;
      const std::vector<int64_t> ids = {1, 15, 300, 7, 42, 999, 3, 12, 5, 77, 512, 8};
      KvCache cache;
      ForwardResult step = forward_step(ck, std::span(ids).first(5), cache, fo);
      for (size_t t = 5; t < ids.size(); ++t)
        step = forward_step(ck, std::span(ids).subspan(t, 1), cache, fo);
      EXPECT_EQ(cache.past, int64_t(ids.size()));
      const ForwardResult whole = forward(ck, ids, fo);
      const int64_t V = whole.vocab;
      const std::vector<float> last(whole.logits.end() - V, whole.logits.end());
      ASSERT_EQ(step.logits.size(), last.size());
      const Cmp c = compare(step.logits, last);
      EXPECT_LE(c.rel, 1e-5) << model << " " << attention_name(at);
      EXPECT_EQ(c.pattern_mismatch, 0);
    }
  }
}

TEST(Generate, NonFiniteLogitsEndTheRunAndNameTheSite) {
  // qwen3-fp16-attn: its fp16 eager attention scores overflow (make_models.py).
  const Checkpoint ck = Checkpoint::open(kFx / "models" / "qwen3-fp16-attn");
  GenerateOptions o;
  o.prompt = {1, 15, 300, 7, 42, 999, 3, 12};
  o.dtype = DType::F16;
  o.attention = AttentionProfile::Eager;
  o.max_new_tokens = 8;
  const GenerateResult g = generate(ck, o);
  ASSERT_FALSE(g.finite());
  EXPECT_EQ(g.finish_reason, "nonfinite");
  EXPECT_EQ(g.first_nonfinite->step, 0);
  EXPECT_NE(g.first_nonfinite->site.find("self_attn"), std::string::npos)
      << g.first_nonfinite->site;
  o.attention = AttentionProfile::Fused;  // the same model under fused attention stays finite
  EXPECT_TRUE(generate(ck, o).finite());
}

TEST(Generate, BadSamplingValuesAreInputErrors) {
  const Checkpoint ck = Checkpoint::open(kFx / "models" / "qwen3-tiny");
  GenerateOptions o;
  o.prompt = {1, 2, 3};
  o.top_p = 0.0;
  o.temperature = 1.0;
  EXPECT_THROW(generate(ck, o), InputError);
  o.top_p = 1.0;
  o.temperature = 0.0;
  o.top_k = 5;  // top-k without sampling
  EXPECT_THROW(generate(ck, o), InputError);
  o.prompt.clear();
  o.top_k = 0;
  EXPECT_THROW(generate(ck, o), InputError);
}

TEST(Generate, SamplingIsReproducibleForASeed) {
  const Checkpoint ck = Checkpoint::open(kFx / "models" / "trained-base");
  GenerateOptions o;
  o.prompt = {1, 15, 300, 7, 42};
  o.temperature = 0.8;
  o.top_k = 50;
  o.top_p = 0.95;
  o.seed = 7;
  o.max_new_tokens = 16;
  const GenerateResult a = generate(ck, o), b = generate(ck, o);
  EXPECT_EQ(a.ids, b.ids);
  o.seed = 8;
  const GenerateResult c = generate(ck, o);
  EXPECT_NE(a.ids, c.ids);
}

// compare: a model against itself is identical; fp16 against fp32 differs a little; the
// merged model against base + adapter unmerged agrees to rounding.
TEST(Compare, FiguresOfKnownPairs) {
  const Checkpoint base = Checkpoint::open(kFx / "models" / "qwen3-tiny");
  const Checkpoint merged = Checkpoint::open(kFx / "merged" / "lora-bf16");
  const std::vector<int64_t> ids = {1, 15, 300, 7, 42, 999, 3, 12};
  CompareSide a{&base, nullptr, DType::F32, AttentionProfile::Eager, "base fp32"};
  CompareResult same = compare(a, a, ids);
  for (const StateDiff& d : same.states) {
    EXPECT_EQ(d.rel_err, 0.0);
    EXPECT_NEAR(d.cosine, 1.0, 1e-12);
  }
  EXPECT_NEAR(same.kl, 0.0, 1e-12);
  EXPECT_EQ(same.top1_agreement, 1.0);
  EXPECT_DOUBLE_EQ(same.nll_a, same.nll_b);

  CompareSide m{&merged, nullptr, DType::F32, AttentionProfile::Eager, "merged"};
  CompareSide u{&base, AdapterOverlay::open(kFx / "adapters" / "lora-bf16", base), DType::F32,
                AttentionProfile::Eager, "base + adapter"};
  CompareResult mu = compare(m, u, ids);
  CompareResult mb = compare(m, a, ids);
  // The merged weights are rounded to bf16 once; the unmerged branch is exact: close, and far
  // closer than the bare base is.
  EXPECT_LT(mu.states.back().rel_err, 2e-2);
  EXPECT_GT(mb.states.back().rel_err, 10 * mu.states.back().rel_err);
}

TEST(Cli, GenerateAndCompareJson) {
  using nanscope::testing::fixture;
  using nanscope::testing::run_cli;
  auto g = run_cli({"generate", fixture("models/trained-base"), "--ids", "1,15,300,7",
                    "--max-new-tokens", "6", "--json"});
  ASSERT_EQ(g.exit_code, 0) << g.err;
  const auto j = g.json();
  EXPECT_EQ(j.at("ids").size(), 6u);
  EXPECT_TRUE(j.at("text").is_string());
  EXPECT_EQ(j.at("finish_reason"), "length");
  EXPECT_TRUE(j.at("first_nonfinite").is_null());

  auto bad = run_cli({"generate", fixture("models/qwen3-fp16-attn"), "--ids", "1,15,300,7,42,999,3,12",
                      "--dtype", "fp16", "--json"});
  EXPECT_EQ(bad.exit_code, 1) << bad.err;
  EXPECT_FALSE(bad.json().at("first_nonfinite").is_null());

  auto c = run_cli({"compare", fixture("models/qwen3-tiny"), fixture("models/qwen3-tiny"),
                    "--dtype-a", "fp16", "--dtype-b", "fp32", "--ids", "1,15,300,7", "--json",
                    "--generate", "4"});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  const auto cj = c.json();
  EXPECT_EQ(cj.at("states").size(), 4u);  // qwen3-tiny: 3 layers -> 4 states
  EXPECT_GT(cj.at("states").back().at("rel_err").get<double>(), 0.0);
  EXPECT_EQ(cj.at("generate").at("a").size(), 4u);

  auto nf = run_cli({"compare", fixture("models/qwen3-fp16-attn"), fixture("models/qwen3-fp16-attn"),
                     "--dtype-a", "fp16", "--dtype-b", "fp32", "--ids", "1,15,300,7,42,999,3,12", "--json"});
  EXPECT_EQ(nf.exit_code, 1);
  EXPECT_FALSE(nf.json().at("finite").at("a").get<bool>());

  auto missing = run_cli({"generate", fixture("models/qwen3-tiny"), "--adapter",
                          fixture("adapters/no-such"), "--ids", "1"});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.err.find("no-such"), std::string::npos) << missing.err;
}

}  // namespace
}  // namespace nanscope

namespace nanscope {
namespace {

// hidden --adapter: the states are PeftModel's (the unmerged golden), the adapter is recorded in
// the run's settings, and resuming the run without it is refused.
TEST(Cli, HiddenWithAnAdapterIsPeftModelsAndCannotBeResumedWithout) {
  using nanscope::testing::fixture;
  using nanscope::testing::run_cli;
  namespace fs = std::filesystem;
  Golden g{SafetensorsFile::open(kFx / "goldens" / "peft" / "lora-bf16__bfloat16__eager.safetensors")};
  const std::vector<int64_t> ids = g.ids();
  const fs::path dir = fs::temp_directory_path() / ("nanscope_hidden_adapter_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  {
    std::ofstream in(dir / "in.jsonl");
    in << nlohmann::json{{"id", "a"}, {"ids", ids}}.dump() << "\n";
  }
  auto r = run_cli({"hidden", fixture("models/qwen3-tiny"), "--adapter", fixture("adapters/lora-bf16"),
                    "--input", (dir / "in.jsonl").string(), "--out", (dir / "out").string(),
                    "--layers", "3", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::ifstream ix(dir / "out" / "index.json");
  const auto index = nlohmann::json::parse(ix);
  EXPECT_NE(index.dump().find("lora-bf16"), std::string::npos) << index.dump();
  const std::string shard = index.at("inputs").at("a").at("file").get<std::string>();
  EXPECT_TRUE(index.at("settings").contains("adapter"));
  const auto f = SafetensorsFile::open(dir / "out" / shard);
  const TensorInfo* t = f->find("a.layer3");
  ASSERT_NE(t, nullptr);
  std::vector<float> ours(t->numel());
  load_to_f32(f->data(*t).data(), t->dtype, ours.data(), ours.size());
  const Cmp c = compare(ours, g.get("hidden.3"));
  EXPECT_EQ(c.bit_identical, c.n);  // bit for bit in bf16, as test_adapter_unmerged.cpp
  auto again = run_cli({"hidden", fixture("models/qwen3-tiny"), "--input", (dir / "in.jsonl").string(),
                        "--out", (dir / "out").string(), "--layers", "3"});
  EXPECT_EQ(again.exit_code, 2) << again.err;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace nanscope
