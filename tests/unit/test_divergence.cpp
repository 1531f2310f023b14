// The `adapter_diverged` verdict on real fine-tunes (tools/fixtures/train_adapters.py: a small
// Qwen3 trained on text, LoRA adapters trained on it with peft at sane and far too high learning
// rates, merged by peft in bf16 on the CPU). The figures nanscope weighs are checked against
// torch's own (facts.json), and the verdicts: every diverged case FAILs with that cause, merged
// or unmerged, and no dtype advice; every healthy one PASSes.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "formats/checkpoint.hpp"
#include "model/adapter_overlay.hpp"
#include "tools/check.hpp"
#include "tools/divergence.hpp"

namespace nanscope {
namespace {

namespace fs = std::filesystem;
const fs::path kFx = fs::path(NANSCOPE_FIXTURES);

// Python's json writes inf and NaN as bare Infinity / NaN (fp16 maxima of the diverged runs):
// read those as null.
nlohmann::json facts() {
  std::ifstream f(kFx / "goldens" / "trained" / "facts.json");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  for (const std::string tok : {"-Infinity", "Infinity", "NaN"})
    for (size_t at = text.find(tok); at != std::string::npos; at = text.find(tok, at))
      text.replace(at, tok.size(), "null");
  return nlohmann::json::parse(text);
}

TEST(Divergence, FiguresMatchTorchOnTheTrainedCases) {
  const auto F = facts();
  const Checkpoint base = Checkpoint::open(kFx / "models" / "trained-base");
  const auto ids = F.at("prompt_ids").get<std::vector<int64_t>>();
  const RunFigures bare = fp32_figures(base, nullptr, ids);
  EXPECT_NEAR(bare.nll, F.at("base_prompt_nll_fp32").get<double>(), 1e-4);
  ASSERT_GE(F.at("cases").size(), 6u);
  for (const auto& [name, c] : F.at("cases").items()) {
    const auto ov = AdapterOverlay::open(kFx / "adapters" / ("trained-" + name), base);
    // ||scale * B @ A|| / ||W|| per module, as torch computed it from peft's get_delta_weight.
    const std::vector<UpdateNorm> ours = adapter_update_norms(*ov, base);
    ASSERT_EQ(ours.size(), c.at("rel_update_norm").size()) << name;
    for (const UpdateNorm& u : ours) {
      const std::string module = u.tensor.substr(0, u.tensor.size() - std::string(".weight").size());
      const double want = c.at("rel_update_norm").at(module).get<double>();
      EXPECT_NEAR(u.rel, want, 1e-4 * want + 1e-7) << name << " " << module;
    }
    // The model with the adapter unmerged, in fp32: NLL and state maxima as torch's merged fp32
    // model gives them (the merge rounds to bf16 once: a little apart).
    const RunFigures tuned = fp32_figures(base, ov.get(), ids);
    EXPECT_NEAR(tuned.nll, c.at("merged_prompt_nll_fp32").get<double>(), 0.05) << name;
    const auto hm = c.at("merged_hidden_max_fp32").get<std::vector<double>>();
    ASSERT_EQ(tuned.state_abs_max.size(), hm.size());
    for (size_t i = 0; i + 1 < hm.size(); ++i)
      EXPECT_NEAR(tuned.state_abs_max[i], hm[i], 0.02 * hm[i]) << name << " state " << i;
  }
}

struct Verdict {
  std::string name;
  bool diverged;
};

class TrainedCase : public ::testing::TestWithParam<std::string> {};

TEST_P(TrainedCase, VerdictUnmergedAndMerged) {
  const std::string name = GetParam();
  const bool diverged = name.rfind("diverged", 0) == 0;
  const auto F = facts();
  CheckOptions o;
  o.ids = F.at("prompt_ids").get<std::vector<int64_t>>();
  o.adapter = kFx / "adapters" / ("trained-" + name);
  std::vector<CheckResult> results;
  results.push_back(check(kFx / "models" / "trained-base", o));  // base + adapter, unmerged
  EXPECT_TRUE(results.back().adapter_unmerged);
  const fs::path merged = kFx / "merged" / ("trained-" + name);
  if (fs::exists(merged)) {  // peft's merge_and_unload in bf16, checked against its base
    o.base = kFx / "models" / "trained-base";
    results.push_back(check(merged, o));
    EXPECT_FALSE(results.back().adapter_unmerged);
    EXPECT_EQ(results.back().unmerged_runs.size(), o.dtypes.size());
  }
  for (const CheckResult& r : results) {
    ASSERT_TRUE(r.divergence.has_value());
    EXPECT_EQ(r.divergence->diverged, diverged) << name << ": " << r.divergence->detail;
    if (diverged) {
      EXPECT_FALSE(r.pass());
      ASSERT_FALSE(r.causes.empty());
      EXPECT_EQ(r.causes.front().kind, CauseKind::AdapterDiverged);
      EXPECT_FALSE(r.causes.front().dtype.has_value());  // every dtype
      EXPECT_NE(r.causes.front().fix.find("earlier checkpoint"), std::string::npos);
      for (const Cause& c : r.causes)  // "run in bf16" would be wrong advice here
        EXPECT_NE(c.kind, CauseKind::ActivationOverflow) << c.fix;
    } else {
      EXPECT_TRUE(r.pass()) << name << ": " << (r.causes.empty() ? "" : r.causes[0].detail);
      EXPECT_LT(r.divergence->growth, kDivergedGrowth / 10);
      EXPECT_LT(r.divergence->worst.rel, kDivergedUpdate / 5);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Trained, TrainedCase,
                         ::testing::Values("healthy-r8-lr2e-4", "healthy-r16-lr1e-3",
                                           "healthy-r4-lr3e-3-rslora", "healthy-r64-lr5e-3",
                                           "diverged-r8-lr5e-2", "diverged-r16-lr3e-1"),
                         [](const auto& p) {
                           std::string n = p.param;
                           for (char& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

}  // namespace
}  // namespace nanscope
