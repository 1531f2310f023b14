// `nanscope trace`: runs a checkpoint the way transformers does in a run dtype, reports every
// hidden state (the familiar quick test) and names the first site that produced inf/NaN, with
// what that same site computes in fp32.
//
// API for the CLI (src/cli) and for `check`:
//   TraceOptions opt;  opt.ids = {...};  opt.dtype = DType::F16;  opt.save = "out.safetensors";
//   TraceResult r = trace(checkpoint, opt);         // throws InputError / OutputError
//   std::cout << trace_json(r).dump(2);             // --json
//   std::cout << trace_text(r);                     // human output
//   exit code: r.finite() ? 0 : 1
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "formats/checkpoint.hpp"
#include "model/adapter_overlay.hpp"
#include "model/forward.hpp"
#include "numerics/kernels.hpp"
#include "numerics/stats.hpp"

namespace nanscope {

// The CLI spellings of run dtypes: "fp32" | "bf16" | "fp16" (also "float32", "bfloat16", ...).
std::optional<DType> parse_run_dtype(std::string_view s);
std::string_view run_dtype_name(DType t);  // "fp32" | "bf16" | "fp16"

struct TraceOptions {
  std::vector<int64_t> ids;                      // token ids (or, with embeddings set, ignored)
  std::optional<std::vector<float>> embeddings;  // [T, hidden_size] inputs_embeds instead of ids
  DType dtype = DType::BF16;
  AttentionProfile attention = AttentionProfile::Eager;
  Device device = Device::Cpu;  // the fp32 shadow pass runs there too
  std::optional<std::filesystem::path> save;  // --save: hidden.0..N, logits, input_ids
  // Rerun in fp32 up to the first non-finite site to report value_fp32 (one more pass through
  // the weights up to that layer). Off: value_fp32 is absent.
  bool shadow_fp32 = true;
  // A PEFT adapter applied unmerged (PeftModel's computation), opened against the same
  // checkpoint; null: the bare model.
  std::shared_ptr<const AdapterOverlay> adapter;
  // Keep the peak |value| of every site (TraceResult::sites): check's report draws them.
  bool site_peaks = false;
};

// One site of a run, as the report's heat map draws it.
struct SitePeak {
  int64_t layer = -1;   // -1 for model.embed_tokens, model.norm, lm_head
  std::string site;     // "model.layers.1.self_attn.scores"
  double peak_abs = 0;  // SiteView::peak_abs: largest finite |value| (eager scores: unscaled q.k^T)
  bool finite = true;   // SiteView::finite
};

struct HiddenStateStats {
  int64_t index = 0;
  ValueStats stats;  // NaN / inf counted per element; min / max / abs_max over finite elements
};

struct FirstNonfinite {
  int64_t layer = -1;  // -1 for model.embed_tokens, model.norm, lm_head
  std::string site;    // "model.layers.1.mlp.down_proj"
  std::vector<int64_t> shape;
  ValueStats stats;  // of the site's values in the run dtype
  // What the same site computes in an fp32 run of the same inputs: the largest finite |value|
  // among its intermediate results (for eager scores, the unscaled q.k^T). Absent when the
  // shadow pass was off, the run dtype is fp32 itself, or the site is non-finite in fp32 too.
  std::optional<double> value_fp32;
  bool finite_in_fp32 = false;  // the site is finite in fp32 (false: the weights/inputs hold it)
};

struct TraceResult {
  DType dtype = DType::BF16;
  AttentionProfile attention = AttentionProfile::Eager;
  std::vector<int64_t> tokens;  // empty when run from embeddings
  int64_t T = 0, hidden_size = 0, vocab = 0, layers = 0;
  std::vector<HiddenStateStats> hidden;  // N + 1 states
  ValueStats logits;
  std::optional<FirstNonfinite> first_nonfinite;
  // Every site in order, with TraceOptions::site_peaks.
  std::vector<SitePeak> sites;
  uint64_t weight_bytes = 0;  // weights the run-dtype pass read (MoE: the routed experts only)
  std::string adapter;        // the adapter's directory when one was applied unmerged
  bool finite() const;        // every hidden state and the logits finite
};

// Runs the trace; writes opt.save (atomically) when set. Throws InputError on bad input
// (out-of-range id, missing tensor, unsupported model), OutputError when --save fails.
TraceResult trace(const Checkpoint& ck, const TraceOptions& opt);

// The JSON of docs/interface.md: {"dtype", "attention", "tokens", "hidden": [{"index",
// "finite", "min", "max", "abs_max", "nan", "inf"}], "logits": {...}, "first_nonfinite":
// null | {"layer", "site", "value_fp32", "finite_in_fp32"}}. Non-finite numbers become null.
nlohmann::json trace_json(const TraceResult& r);

// The human quick-test table: "Layer 36: [1, 4, 2560] min=-12.5 max=14.1 [OK]" per hidden
// state, the logits line, then the first non-finite site (or "All finite.").
std::string trace_text(const TraceResult& r);

}  // namespace nanscope
