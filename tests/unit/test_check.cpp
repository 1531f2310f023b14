// `nanscope check` on the cases it must tell apart, all made with transformers / peft on the
// oracle machine (tests/fixtures): each must give the right causes, in order of origin.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "cli_util.hpp"
#include "tools/check.hpp"
#include "tools/html_report.hpp"

using namespace nanscope;
using namespace nanscope::testing;
using ::testing::HasSubstr;

namespace {

const std::vector<int64_t> kIds = {1, 15, 300, 7, 42, 999, 3, 12};

std::vector<std::string> kinds(const CheckResult& r) {
  std::vector<std::string> k;
  for (const auto& c : r.causes) k.push_back(cause_kind_name(c.kind));
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
  EXPECT_EQ(r.causes[0].kind, CauseKind::AdapterNonfinite);
  EXPECT_THAT(r.causes[0].tensor, HasSubstr("layers.1.self_attn.q_proj.lora_B"));
  EXPECT_EQ(r.causes[1].kind, CauseKind::WeightsNonfinite);
  EXPECT_EQ(r.causes[1].tensor, "model.layers.1.self_attn.q_proj.weight");
  EXPECT_THAT(r.causes[1].detail, HasSubstr("inherited from the adapter"));
  // No activation cause: the weights are to blame, not the dtype.
  for (const auto& c : r.causes) EXPECT_NE(c.kind, CauseKind::ActivationOverflow);
}

TEST(Check, PoisonedMergedModelAloneIsWeightsNonfinite) {
  CheckResult r = run_check("merged/poisoned");
  ASSERT_FALSE(r.causes.empty());
  EXPECT_EQ(r.causes[0].kind, CauseKind::WeightsNonfinite);
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
  for (const auto& c : peft.causes) EXPECT_EQ(c.kind, CauseKind::Structure);
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

TEST(CheckReport, ReferenceRunKeepsEverySiteForTheHeatMap) {
  CheckOptions opt;
  opt.prompt = "some words";
  CheckResult r = run_check("models/qwen3-fp16-attn", opt);
  const auto& sites = r.report.fp32_sites;
  // 3 layers of 18 sites (Qwen3: the norms of q and k too), the embeddings, the norm, lm_head.
  ASSERT_EQ(sites.size(), 3u * 18 + 3) << sites.size();
  EXPECT_EQ(sites.front().site, "model.embed_tokens");
  EXPECT_EQ(sites.back().site, "lm_head");
  const SitePeak* scores = nullptr;
  for (const auto& s : sites) {
    EXPECT_TRUE(s.finite) << s.site;  // fp32 holds everything
    if (s.site == "model.layers.0.self_attn.scores") scores = &s;
  }
  ASSERT_NE(scores, nullptr);
  EXPECT_EQ(scores->layer, 0);
  // The value the fp16 run's shadow pass reports for the same site, and beyond fp16's range.
  for (const auto& run : r.runs)
    if (run.dtype == DType::F16 && run.attention == AttentionProfile::Eager) {
      ASSERT_TRUE(run.trace && run.trace->first_nonfinite &&
                  run.trace->first_nonfinite->value_fp32);
      EXPECT_EQ(scores->peak_abs, *run.trace->first_nonfinite->value_fp32);
    }
  EXPECT_GT(scores->peak_abs, 65504);
  EXPECT_TRUE(r.runs[0].trace->sites.empty());  // moved, not copied
  EXPECT_EQ(r.report.prompt, "some words");
  EXPECT_FALSE(r.report.version.empty());
  EXPECT_THAT(r.report.date, ::testing::MatchesRegex("20[0-9][0-9]-[01][0-9]-[0-3][0-9] "
                                                     "[0-2][0-9]:[0-5][0-9] UTC"));
}

TEST(CheckReport, HtmlIsSelfContainedAndMarksTheOverflowingSite) {
  TempDir d;
  const auto page = d.path / "report.html";
  auto cli = run_cli({"check", fixture("models/qwen3-fp16-attn"), "--ids", "1,15,300,7,42,999,3,12",
                      "--report", page.string()});
  ASSERT_EQ(cli.exit_code, 1) << cli.err;
  EXPECT_THAT(cli.out, HasSubstr("Report: " + page.string()));
  std::ifstream in(page);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string html = ss.str();
  for (const char* banned : {"<script", "http://", "https://", "<link", "<img", "url("})
    EXPECT_EQ(html.find(banned), std::string::npos) << banned;
  // Causes, then facts, then the heat map.
  const size_t causes = html.find("id=\"causes\""), facts = html.find("id=\"facts\""),
               heat = html.find("id=\"heatmaps\"");
  ASSERT_NE(heat, std::string::npos);
  EXPECT_LT(causes, facts);
  EXPECT_LT(facts, heat);
  // One cell marked first in the fp16 eager panel, at layer 0's scores, and none elsewhere.
  const size_t panel = html.find("data-run=\"fp16 eager\"");
  ASSERT_NE(panel, std::string::npos);
  const size_t end = html.find("</figure>", panel);
  const std::string fp16 = html.substr(panel, end - panel);
  const std::string marked = " first\" data-layer";  // a cell's class ends with "first"
  const size_t first = fp16.find(marked);
  ASSERT_NE(first, std::string::npos);
  EXPECT_EQ(fp16.find(marked, first + 1), std::string::npos);
  EXPECT_THAT(fp16.substr(first, 120), HasSubstr("data-site=\"model.layers.0.self_attn.scores\""));
  EXPECT_THAT(fp16.substr(first - 20, 40), HasSubstr("class=\"c over first\""));
  size_t firsts = 0;
  for (size_t p = html.find(marked); p != std::string::npos; p = html.find(marked, p + 1)) ++firsts;
  EXPECT_EQ(firsts, 1u);  // fp32, bf16 and fp16 fused stay finite
  for (const char* fact :
       {"<dt>Model</dt>", "<dt>Prompt</dt>", "<dt>nanscope</dt>", "<dt>Date</dt>"})
    EXPECT_THAT(html, HasSubstr(fact));
  EXPECT_EQ(html.find("<dt>Base</dt>"), std::string::npos);  // none given
}

TEST(CheckReport, JsonSaysWhereTheReportWent) {
  TempDir d;
  const auto page = d.path / "r.html";
  auto cli = run_cli({"check", fixture("models/qwen3-tiny"), "--ids", "1,15,300", "--json",
                      "--report", page.string()});
  ASSERT_EQ(cli.exit_code, 0) << cli.err;
  EXPECT_EQ(cli.json()["report"], page.string());
  EXPECT_TRUE(std::filesystem::exists(page));
}

TEST(CheckReport, UnwritablePathsFailBeforeAnyForwardPass) {
  TempDir d;
  const std::string missing_dir = (d.path / "no-such-dir" / "r.html").string();
  auto cli = run_cli(
      {"check", fixture("models/qwen3-tiny"), "--ids", "1,15,300", "--report", missing_dir});
  EXPECT_EQ(cli.exit_code, 2);
  EXPECT_THAT(cli.err, HasSubstr("--report " + missing_dir));
  EXPECT_THAT(cli.err, HasSubstr("does not exist"));
  EXPECT_EQ(cli.out, "");  // no verdict: nothing ran
  cli = run_cli(
      {"check", fixture("models/qwen3-tiny"), "--ids", "1,15,300", "--report", d.path.string()});
  EXPECT_EQ(cli.exit_code, 2);
  EXPECT_THAT(cli.err, HasSubstr("is a directory"));
  const std::string save = (d.path / "nope" / "h.safetensors").string();
  cli = run_cli({"trace", fixture("models/qwen3-tiny"), "--ids", "1,15,300", "--save", save});
  EXPECT_EQ(cli.exit_code, 2);
  EXPECT_THAT(cli.err, HasSubstr("--save " + save));
  EXPECT_EQ(cli.out, "");
  EXPECT_TRUE(std::filesystem::is_empty(d.path));  // no probe left behind
}

TEST(CheckReport, DivergenceSectionOnlyWithData) {
  EXPECT_EQ(divergence_section({}), "");
  const std::string s = divergence_section({{"a vs b", {0.0, 0.25, std::nan("")}}});
  EXPECT_THAT(s, HasSubstr("id=\"divergence\""));
  EXPECT_THAT(s, HasSubstr("<td>0.25</td>"));
  EXPECT_THAT(s, HasSubstr("not finite"));
}

TEST(CheckReport, HeatMapColumnsFollowTheComputationAndFusedScoresUseFp32sLimit) {
  // Layer 0 a mixture of experts (router "mlp.gate", "mlp"), layer 1 a dense MLP: the dense
  // sites go where they are computed, not after the last column.
  auto at = [](int64_t l, const std::string& suffix, double peak) {
    return SitePeak{l, fmt::format("model.layers.{}.{}", l, suffix), peak, true};
  };
  const std::vector<SitePeak> sites = {{-1, "model.embed_tokens", 1.0, true},
                                       at(0, "self_attn.scores", 1e5),
                                       at(0, "mlp.gate", 3.0),
                                       at(0, "mlp", 2.0),
                                       at(0, "residual_mlp", 2.5),
                                       at(1, "self_attn.scores", 4.0),
                                       at(1, "mlp.gate_proj", 5.0),
                                       at(1, "mlp.down_proj", 70000.0),
                                       at(1, "residual_mlp", 6.0),
                                       {-1, "lm_head", 9.0, true}};
  ReportRun eager{"fp16 eager", "fp16", 65504, {}, true, false, "", std::nullopt};
  eager.first_nonfinite =
      std::make_pair(int64_t(0), std::string("model.layers.0.self_attn.scores"));
  ReportRun fused{"fp16 fused", "fp16", 65504, {"self_attn.scores", "self_attn.probs"},
                  true,         false,  "",    std::nullopt};
  const std::string h = heat_map_section(sites, {eager, fused});
  std::vector<size_t> pos;
  for (const char* col : {"\"self_attn.scores\"", "\"mlp.gate_proj\"", "\"mlp.down_proj\"",
                          "\"mlp.gate\"", "\"mlp\"", "\"residual_mlp\""})
    pos.push_back(h.find(std::string("<th class=\"col\" title=") + col));
  for (size_t i = 0; i < pos.size(); ++i) ASSERT_NE(pos[i], std::string::npos) << i;
  EXPECT_TRUE(std::is_sorted(pos.begin(), pos.end()));
  const size_t f = h.find("data-run=\"fp16 fused\"");
  ASSERT_NE(f, std::string::npos);
  const std::string eager_panel = h.substr(0, f), fused_panel = h.substr(f);
  const std::string scores = "data-site=\"model.layers.0.self_attn.scores\"";
  const std::string down = "data-site=\"model.layers.1.mlp.down_proj\"";
  EXPECT_THAT(eager_panel, HasSubstr("class=\"c over first\" data-layer=\"0\" " + scores));
  EXPECT_THAT(fused_panel, HasSubstr("class=\"c\" data-layer=\"0\" " + scores));     // fp32 there
  EXPECT_THAT(fused_panel, HasSubstr("class=\"c over\" data-layer=\"1\" " + down));  // fp16
  EXPECT_THAT(h, HasSubstr("id=\"closest\""));
}

TEST(CheckReport, LongPromptIsCutOnACharacterBoundary) {
  CheckResult r;
  r.model = "m";
  r.report.prompt = std::string(399, 'a') + "\u00e9" + std::string(600, 'z');  // é: 2 bytes
  const std::string html = check_html(r);
  EXPECT_THAT(html, HasSubstr(std::string(399, 'a') + " ... (1001 bytes in all)"));
  EXPECT_EQ(html.find("zzz"), std::string::npos);
  EXPECT_THAT(html, HasSubstr("No fp32 reference run"));  // nothing ran: no map, no crash
}
