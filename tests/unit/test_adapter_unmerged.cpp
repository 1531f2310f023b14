// Adapters applied without merging against the real peft: every golden of
// tools/fixtures/make_peft_goldens.py (PeftModel.from_pretrained on the base in each dtype, peft
// 0.21's defaults) -- hidden states and logits -- for LoRA, rsLoRA, patterns, DoRA (linear and
// embedding), embedding LoRA (tied and untied), lm_head LoRA, modules_to_save, trainable tokens,
// LoRA biases, bias="all", layers_to_transform, a poisoned adapter and the new families.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.hpp"
#include "formats/checkpoint.hpp"
#include "golden_util.hpp"
#include "model/adapter_overlay.hpp"
#include "model/forward.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;
const fs::path kFx = fs::path(NANSCOPE_FIXTURES);
const char* kMake =
    "python3 tools/fixtures/make_peft_goldens.py --models tests/fixtures/models --adapters "
    "tests/fixtures/adapters --out tests/fixtures/goldens/peft";

class Hidden : public Observer {
 public:
  void hidden_state(int64_t, std::span<const float> v, int64_t, int64_t) override {
    states.emplace_back(v.begin(), v.end());
  }
  std::vector<std::vector<float>> states;
};

struct PeftCase {
  std::string adapter, dtype, attn;
  std::string name() const { return adapter + "__" + dtype + "__" + attn; }
};

std::vector<PeftCase> peft_cases() {
  std::vector<PeftCase> v;
  std::ifstream f(kFx / "goldens" / "peft" / "VERSIONS.json");
  if (!f) return {{"VERSIONS.json-missing", "float32", "eager"}};
  const auto j = nlohmann::json::parse(f);
  for (const auto& w : j.at("written")) {
    std::string s = w.get<std::string>();
    s = s.substr(0, s.size() - std::string(".safetensors").size());
    const size_t a = s.find("__"), b = s.rfind("__");
    v.push_back({s.substr(0, a), s.substr(a + 2, b - a - 2), s.substr(b + 2)});
  }
  return v;
}

// Norm-wise tolerance: fp32 is the accumulation-order floor; bf16/fp16 allow a rounding flip of
// the base pass or of the fp32 LoRA add propagated through a tiny model (test_forward.cpp's
// bounds for the same families).
double peft_tolerance(DType dt) {
  return dt == DType::F32 ? 1e-5 : dt == DType::BF16 ? 1e-2 : 5e-3;
}

class PeftGolden : public ::testing::TestWithParam<PeftCase> {};

TEST_P(PeftGolden, HiddenStatesAndLogitsMatchPeftModel) {
  const PeftCase& c = GetParam();
  const fs::path gp = kFx / "goldens" / "peft" / (c.name() + ".safetensors");
  ASSERT_TRUE(fs::exists(gp)) << gp << " is missing; make it with: " << kMake;
  Golden g{SafetensorsFile::open(gp)};
  const fs::path adir = kFx / "adapters" / c.adapter;
  std::ifstream cf(adir / "case.json");
  const std::string base = nlohmann::json::parse(cf).at("base").get<std::string>();
  const Checkpoint ck = Checkpoint::open(kFx / "models" / base);
  const auto ov = AdapterOverlay::open(adir, ck);
  const DType dt = dtype_of(c.dtype);
  ForwardOptions opt;
  opt.dtype = dt;
  opt.attention = c.attn == "eager" ? AttentionProfile::Eager : AttentionProfile::Fused;
  opt.adapter = ov.get();
  Hidden cap;
  const std::vector<int64_t> ids = g.ids();
  const ForwardResult r = forward(ck, ids, opt, &cap);
  opt.adapter = nullptr;
  Hidden bare;
  const ForwardResult rb = forward(ck, ids, opt, &bare);

  const size_t N = cap.states.size();
  double worst = 0, bare_err = 0;
  int64_t total = 0, identical = 0;
  for (size_t i = 0; i <= N; ++i) {
    const bool logits = i == N;
    const std::string key = logits ? "logits" : "hidden." + std::to_string(i);
    const std::vector<float> gold = g.get(key);
    ASSERT_FALSE(gold.empty()) << key << " missing from " << gp;
    const std::vector<float>& ours = logits ? r.logits : cap.states[i];
    ASSERT_EQ(ours.size(), gold.size()) << key;
    const Cmp m = compare(ours, gold);
    EXPECT_EQ(m.pattern_mismatch, 0) << key << ": finite pattern differs in "
                                     << m.pattern_mismatch << " of " << m.n;
    EXPECT_LE(m.rel, peft_tolerance(dt)) << key << ": relative error " << m.rel;
    worst = std::max(worst, m.rel);
    total += m.n;
    identical += m.bit_identical;
    const Cmp mb = compare(logits ? rb.logits : bare.states[i], gold);
    if (mb.pattern_mismatch == 0) bare_err = std::max(bare_err, mb.rel);
  }
  // The adapter must matter: the bare model is far from PeftModel's numbers (a pass that
  // ignored the adapter would fail here), unless the poisoned adapter makes everything NaN.
  if (c.adapter != "poisoned") {
    EXPECT_GT(bare_err, std::max(10 * worst, 1e-3))
        << "the bare model is as close to the golden as the adapted one";
  }
  std::printf("[ peft     ] %-52s max rel err %.2e (bare model %.2e), bit-identical %.4f%%\n",
              c.name().c_str(), worst, bare_err, 100.0 * double(identical) / double(total));
}

INSTANTIATE_TEST_SUITE_P(Goldens, PeftGolden, ::testing::ValuesIn(peft_cases()),
                         [](const auto& p) {
                           std::string n = p.param.name();
                           std::replace_if(n.begin(), n.end(), [](char ch) { return !std::isalnum(static_cast<unsigned char>(ch)); }, '_');
                           return n;
                         });

TEST(AdapterOverlay, MissingAdapterDirectoryIsAnInputErrorNamingIt) {
  const Checkpoint ck = Checkpoint::open(kFx / "models" / "qwen3-tiny");
  try {
    AdapterOverlay::open(kFx / "adapters" / "no-such-adapter", ck);
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("no-such-adapter"), std::string::npos) << e.what();
  }
}

TEST(AdapterOverlay, AnAdapterForAnotherBaseIsRefusedWithShapes) {
  // lora-lmhead... llama-tiny's adapter on qwen3-tiny: shapes differ, named in the message.
  const Checkpoint ck = Checkpoint::open(kFx / "models" / "qwen3-tiny");
  EXPECT_THROW(AdapterOverlay::open(kFx / "adapters" / "embed-lmhead-untied", ck), InputError);
}

}  // namespace
}  // namespace nanscope
