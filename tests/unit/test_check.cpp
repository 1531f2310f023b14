// `nanscope check` on the cases it must tell apart, all made with transformers / peft on the
// oracle machine (tests/fixtures): each must give the right causes, in order of origin.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "cli_util.hpp"
#include "tools/check.hpp"

using namespace nanscope;
using namespace nanscope::testing;
using ::testing::HasSubstr;

namespace {

const std::vector<int64_t> kIds = {1, 15, 300, 7, 42, 999, 3, 12};

std::vector<std::string> kinds(const CheckResult& r) {
  std::vector<std::string> k;
  for (const auto& c : r.causes) k.push_back(c.kind);
  return k;
}

CheckResult run_check(const std::string& model, CheckOptions opt = {}) {
  if (opt.ids.empty()) opt.ids = kIds;
  return check(fixture(model), opt);
}

}  // namespace

TEST(Check, HealthyMergedModelPasses) {
  CheckResult r = run_check("merged/lora-bf16");
  EXPECT_TRUE(r.pass()) << check_text(r);
  ASSERT_EQ(r.runs.size(), 3u);  // fp32 reference, bf16, fp16
  EXPECT_EQ(r.runs[0].dtype, DType::F32);
  auto cli = run_cli({"check", fixture("merged/lora-bf16"), "--ids", "1,15,300", "--json"});
  EXPECT_EQ(cli.exit_code, 0) << cli.err;
  EXPECT_EQ(cli.json()["verdict"], "PASS");
  EXPECT_TRUE(cli.json()["causes"].empty());
}

TEST(Check, PoisonedAdapterIsBlamedBeforeTheWeightsItPoisoned) {
  CheckOptions opt;
  opt.base = fixture("models/qwen3-tiny");
  opt.adapter = fixture("adapters/poisoned");
  CheckResult r = run_check("merged/poisoned", opt);
  ASSERT_FALSE(r.pass());
  ASSERT_GE(r.causes.size(), 2u) << check_text(r);
  EXPECT_EQ(r.causes[0].kind, "adapter_nonfinite");
  EXPECT_THAT(r.causes[0].tensor, HasSubstr("layers.1.self_attn.q_proj.lora_B"));
  EXPECT_EQ(r.causes[1].kind, "weights_nonfinite");
  EXPECT_EQ(r.causes[1].tensor, "model.layers.1.self_attn.q_proj.weight");
  EXPECT_THAT(r.causes[1].detail, HasSubstr("inherited from the adapter"));
  // No activation cause: the weights are to blame, not the dtype.
  for (const auto& c : r.causes) EXPECT_NE(c.kind, "activation_overflow");
}

TEST(Check, PoisonedMergedModelAloneIsWeightsNonfinite) {
  CheckResult r = run_check("merged/poisoned");
  ASSERT_FALSE(r.causes.empty());
  EXPECT_EQ(r.causes[0].kind, "weights_nonfinite");
  EXPECT_THAT(r.causes[0].fix, HasSubstr("--base and --adapter"));
}

TEST(Check, MergeThatOverflowsFp16) {
  CheckOptions opt;
  opt.base = fixture("models/qwen3-tiny-fp16");
  opt.adapter = fixture("adapters/fp16-overflow");
  CheckResult r = run_check("merged/fp16-overflow", opt);
  ASSERT_EQ(kinds(r), std::vector<std::string>{"merge_overflow"}) << check_text(r);
  EXPECT_EQ(r.causes[0].tensor, "model.layers.0.self_attn.v_proj.weight");
}

TEST(Check, MlpOverflowsFp16ButNotBf16) {
  CheckResult r = run_check("models/qwen3-fp16-mlp");
  ASSERT_EQ(kinds(r), std::vector<std::string>{"activation_overflow"}) << check_text(r);
  const Cause& c = r.causes[0];
  EXPECT_EQ(c.dtype, DType::F16);
  EXPECT_EQ(c.layer, 1);
  EXPECT_EQ(c.site, "model.layers.1.mlp.down_proj");
  EXPECT_THAT(c.detail, HasSubstr("65504"));  // the limit, spelled out
  for (const auto& run : r.runs) {
    if (run.dtype != DType::F16) {
      EXPECT_TRUE(run.trace && run.trace->finite());
    }
  }
}

TEST(Check, AttentionOverflowsFp16UnderEagerOnly) {
  CheckResult r = run_check("models/qwen3-fp16-attn");
  ASSERT_EQ(kinds(r), std::vector<std::string>{"activation_overflow"}) << check_text(r);
  const Cause& c = r.causes[0];
  EXPECT_EQ(c.dtype, DType::F16);
  EXPECT_EQ(c.attention, AttentionProfile::Eager);
  EXPECT_EQ(c.site, "model.layers.0.self_attn.scores");
  EXPECT_THAT(c.detail, HasSubstr("another runtime works"));
  bool fused_finite = false;
  for (const auto& run : r.runs)
    if (run.dtype == DType::F16 && run.attention == AttentionProfile::Fused)
      fused_finite = run.trace && run.trace->finite();
  EXPECT_TRUE(fused_finite);
  // With --attention both, the same verdict.
  auto cli = run_cli({"check", fixture("models/qwen3-fp16-attn"), "--ids", "1,15,300,7,42,999,3,12",
                      "--attention", "both", "--json"});
  EXPECT_EQ(cli.exit_code, 1);
  auto j = cli.json();
  EXPECT_EQ(j["verdict"], "FAIL");
  ASSERT_EQ(j["causes"].size(), 1u);
  EXPECT_EQ(j["causes"][0]["kind"], "activation_overflow");
  EXPECT_EQ(j["causes"][0]["attention"], "eager");
  EXPECT_EQ(j["causes"][0]["layer"], 0);
}

TEST(Check, StructureProblemsAreCausesAndTracesAreSkipped) {
  CheckResult missing = run_check("models/qwen3-missing");
  ASSERT_EQ(kinds(missing), std::vector<std::string>{"structure"});
  EXPECT_EQ(missing.causes[0].tensor, "model.layers.1.self_attn.k_proj.weight");
  for (const auto& run : missing.runs) EXPECT_FALSE(run.trace.has_value());

  CheckResult peft = run_check("models/qwen3-peftkeys");
  ASSERT_FALSE(peft.pass());
  for (const auto& c : peft.causes) EXPECT_EQ(c.kind, "structure");
  EXPECT_THAT(peft.causes[0].fix, HasSubstr("merge_and_unload"));
}

TEST(Check, EmbeddingRowsNameTheIdsThatTriggerThem) {
  CheckOptions opt;
  opt.ids = {1, 15, 5, 7};
  CheckResult r = run_check("models/qwen3-embrows", opt);
  ASSERT_EQ(kinds(r), std::vector<std::string>{"embedding_rows"}) << check_text(r);
  EXPECT_EQ(r.bad_embedding_rows, (std::vector<int64_t>{5, 17}));
  EXPECT_THAT(r.causes[0].detail, HasSubstr("this input contains 5"));
  // An input avoiding the rows runs finite, and the verdict still says FAIL for the rows.
  opt.ids = {1, 15, 300, 7};
  CheckResult r2 = run_check("models/qwen3-embrows", opt);
  ASSERT_EQ(kinds(r2), std::vector<std::string>{"embedding_rows"});
  EXPECT_THAT(r2.causes[0].detail, HasSubstr("contains none of them"));
  for (const auto& run : r2.runs) EXPECT_TRUE(run.trace && run.trace->finite());
}

TEST(Check, ExampleFromTheReadme) {
  auto cli = run_cli({"check", fixture("models/qwen3-example"), "--base",
                      fixture("models/qwen3-example-base"), "--adapter",
                      fixture("adapters/example-poisoned"), "--text", "Hello, world!"});
  EXPECT_EQ(cli.exit_code, 1) << cli.err;
  EXPECT_THAT(cli.out, HasSubstr("FAIL"));
  EXPECT_THAT(cli.out, HasSubstr("[9707, 11, 1879, 0]"));
  EXPECT_THAT(cli.out, HasSubstr("adapter_nonfinite"));
  EXPECT_THAT(cli.out, HasSubstr("Layer 0: [1, 4, 64]"));
}

TEST(Check, BadInputExitsTwo) {
  EXPECT_EQ(run_cli({"check", fixture("models/qwen3-tiny"), "--ids", "5000"}).exit_code, 2);
  EXPECT_EQ(run_cli({"check", fixture("models/qwen3-tiny"), "--dtype", "int8"}).exit_code, 2);
  EXPECT_EQ(run_cli({"check", fixture("models/qwen3-tiny"), "--adapter", "/nonexistent"}).exit_code,
            2);
  auto r = run_cli({"check", fixture("models/qwen3-tiny"), "--text", "hi"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("tokenizer"));
}

TEST(CheckReport, HtmlIsSelfContainedAndRendersInChromium) {
  TempDir d;
  const auto page = d.path / "report.html";
  auto cli = run_cli({"check", fixture("models/qwen3-fp16-attn"), "--ids", "1,15,300,7,42,999,3,12",
                      "--report", page.string()});
  ASSERT_EQ(cli.exit_code, 1) << cli.err;
  std::ifstream in(page);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string html = ss.str();
  EXPECT_THAT(html, HasSubstr("<svg id=\"activation-chart\""));
  EXPECT_THAT(html, HasSubstr("fp16 eager"));
  EXPECT_EQ(html.find("http://"), html.find("http://www.w3.org/2000/svg"));  // no fetches
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("https://"), std::string::npos);

  // Render it in headless Chromium: the chart must be in the rendered DOM with its lines.
  if (std::system("command -v chromium >/dev/null 2>&1") != 0)
    GTEST_FAIL() << "chromium is not installed (scripts/install-deps.sh installs it)";
  const auto dom = d.path / "dom.html";
  const std::string cmd =
      "chromium --headless --no-sandbox --disable-gpu --disable-background-networking "
      "--disable-component-update --disable-sync --no-first-run --user-data-dir=" +
      (d.path / "profile").string() + " --dump-dom file://" + page.string() + " > " + dom.string() +
      " 2>/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  std::ifstream din(dom);
  std::stringstream ds;
  ds << din.rdbuf();
  const std::string rendered = ds.str();
  EXPECT_THAT(rendered, HasSubstr("activation-chart"));
  EXPECT_THAT(rendered, HasSubstr("<polyline"));
  EXPECT_THAT(rendered, HasSubstr("class=\"nonfinite\""));  // the fp16 eager NaN states
  EXPECT_THAT(rendered, HasSubstr("id=\"verdict\" class=\"FAIL\""));
}
