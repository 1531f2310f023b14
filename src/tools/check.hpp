// `nanscope check`: the verdict. Scan, then trace in fp32 (the reference) and in each dtype asked
// for; with --base and --adapter, work out where anything non-finite was born (the adapter, the
// base, or the merge arithmetic). Causes come in order of origin, each with its evidence and fix.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "tools/divergence.hpp"
#include "tools/scan.hpp"
#include "tools/trace.hpp"

namespace nanscope {

struct CheckOptions {
  std::optional<std::filesystem::path> base, adapter;
  std::vector<int64_t> ids;
  std::string prompt;  // where the ids came from, said in the verdict: `text "..."`, "ids given"
  std::vector<DType> dtypes = {DType::BF16, DType::F16};
  // Attention profiles to run for every dtype. With eager alone, a dtype whose eager run fails
  // inside attention is also run fused, to show whether SDPA / flash / SGLang would survive it.
  std::vector<AttentionProfile> attentions = {AttentionProfile::Eager};
  int threads = 0;
  // Where the model's runs (fp32 reference and each dtype) compute. The adapter applied unmerged
  // (with --base: evidence beside the merge) and the divergence figures stay on the CPU.
  Device device = Device::Cpu;
};

enum class CauseKind : uint8_t {
  AdapterNonfinite,    // the adapter itself holds NaN / inf
  AdapterDiverged,     // a finite adapter whose update or activations blew up (divergence.hpp)
  WeightsNonfinite,    // NaN / inf in the model's weights (origin in the detail)
  MergeOverflow,       // base and adapter finite, W + dW beyond the output dtype's range
  ActivationOverflow,  // finite weights, a run dtype's activations turn non-finite
  EmbeddingRows,       // non-finite rows of the embedding (which token ids)
  Structure,           // a structural finding of scan (the finding's kind says which)
};
// The JSON spelling: "adapter_nonfinite", "adapter_diverged", "weights_nonfinite",
// "merge_overflow", "activation_overflow", "embedding_rows", "structure".
const char* cause_kind_name(CauseKind k);

struct Cause {
  CauseKind kind = CauseKind::Structure;
  std::optional<DType> dtype;
  std::optional<AttentionProfile> attention;
  std::optional<int64_t> layer;
  std::string site, tensor, detail;
  std::string fix;  // one or two concrete sentences
  std::optional<FindingKind> finding;  // kind Structure: the scan finding behind it
};

struct CheckRun {
  DType dtype;
  AttentionProfile attention;
  std::optional<TraceResult> trace;  // absent when the model cannot run (structure)
  std::string error;                 // why it could not run
};

// What the report page (check_html) shows beyond the causes and runs, collected by check: a
// place for more evidence (compare's per-layer divergence, issue 14, goes here).
struct CheckReportData {
  std::optional<std::filesystem::path> base, adapter;
  std::string prompt;                // empty when the input was ids
  std::string version;               // nanscope's
  std::string date;                  // when check ran, UTC: "2026-12-02 07:10 UTC"
  std::vector<SitePeak> fp32_sites;  // every site of the fp32 reference run, in order
};

struct CheckResult {
  std::filesystem::path model;
  std::vector<int64_t> tokens;
  std::string prompt;  // CheckOptions::prompt
  ScanResult scan;
  std::vector<Cause> causes;
  std::vector<CheckRun> runs;  // fp32 reference first
  std::vector<int64_t> bad_embedding_rows;
  // --adapter without --base: MODEL is the base, the adapter applied unmerged in every run.
  bool adapter_unmerged = false;
  // --base and --adapter: the base with the adapter applied unmerged, per dtype (evidence for
  // choosing between re-merging and loading the adapter unmerged).
  std::vector<CheckRun> unmerged_runs;
  // Against the base (either mode above, or --base alone): did the fine-tune diverge?
  std::optional<Divergence> divergence;
  CheckReportData report;
  bool pass() const { return causes.empty(); }
};

CheckResult check(const std::filesystem::path& model, const CheckOptions& opt);

// The input of a check that was given neither ids nor text: the first of a long and a short
// English prompt whose ids (with `tokenizer`, else MODEL/tokenizer.json) all fit the model's
// vocabulary, else ids 1..8 (every vocabulary of nine tokens or more has them). `prompt` says
// which was taken, and why when it is not the first.
struct CheckInput {
  std::vector<int64_t> ids;
  std::string prompt;
};
CheckInput default_check_input(const std::filesystem::path& model,
                               const std::filesystem::path& tokenizer = {});

nlohmann::json check_json(const CheckResult& r);
std::string check_text(const CheckResult& r);
std::string check_html(const CheckResult& r);

}  // namespace nanscope
