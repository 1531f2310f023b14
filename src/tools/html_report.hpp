// The self-contained HTML page of `check --report`: one file, no network, no scripts, rendered
// here (inline CSS, tables coloured on the server). From top to bottom:
//   1. the verdict and the causes with their fixes (what most readers need, first);
//   2. the facts of the run: model, base, adapter, prompt, tokens, nanscope version, date;
//   3. one line per run (dtype x attention);
//   4. the heat maps: per layer and per site, the peak |x| the fp32 reference computes, coloured
//      by its distance to each run's limit (65504 for fp16), with the run's first non-finite
//      site marked; then the sites closest to a limit, as a table;
//   5. the per-layer divergence of two runs (compare, issue 14), when there is one;
//   6. the per-state tables, folded.
// Readable at 1200 px and at 390 px (a phone): nothing on the page is wider than the screen;
// only wide tables scroll inside their own box.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tools/trace.hpp"

namespace nanscope {

struct ReportFact {
  std::string name, value;
  bool code = false;  // a path or ids: monospace, broken anywhere
};

struct ReportCause {
  std::string kind;    // activation_overflow, ...
  std::string where;   // "fp16 eager · layer 0 · model.layers.0.self_attn.scores"
  std::string detail;  // the evidence, with numbers
  std::string fix;
};

// One run (dtype x attention profile): a panel of the heat map.
struct ReportRun {
  std::string label;  // "fp16 eager"
  std::string dtype;  // "fp16"
  double limit = 0;   // the dtype's largest finite value
  // Sites (suffixes after "model.layers.L.") the run computes in fp32 whatever its dtype: the
  // fused profile's scores and probs. Their limit is fp32's.
  std::vector<std::string> fp32_sites;
  bool ran = false, finite = false;
  std::string summary;  // one line: "finite (max |h| = 3.2)", "NaN from hidden state 1 on"
  std::optional<std::pair<int64_t, std::string>> first_nonfinite;  // layer, full site name
};

// Per-layer divergence of run A from run B (compare, issue 14): one value per hidden state.
struct DivergenceSeries {
  std::string label;            // "merged vs base + adapter (bf16)"
  std::vector<double> rel_err;  // ||a - b|| / ||b|| per hidden state; NaN where not finite
};

struct ReportTable {
  std::string title;
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
};

struct HtmlReport {
  std::string title;    // the page's <title>
  std::string verdict;  // "PASS" | "FAIL"
  std::string subject;  // the line under the verdict: the model
  std::vector<ReportFact> facts;
  std::vector<ReportCause> causes;
  std::vector<ReportRun> runs;
  std::vector<SitePeak> fp32_sites;  // every site of the fp32 reference run; empty: not run
  std::vector<DivergenceSeries> divergence;
  std::vector<ReportTable> tables;  // folded at the end
};

std::string render_html(const HtmlReport& r);
std::string html_escape(const std::string& s);

// Section 4: one panel per run, the fp32 peaks of `sites` against the run's limit. Each cell is a
// <td class="c"> with data-layer, data-site (the full name), data-peak (fp32 |x|) and
// data-ratio (peak / limit); the run's first non-finite site has class "first".
std::string heat_map_section(const std::vector<SitePeak>& sites,
                             const std::vector<ReportRun>& runs);

// Section 5, the room left for `compare` (issue 14): a per-layer divergence chart. Empty when
// there is no series (check alone); today it renders the figures as a table, the chart (inline
// SVG, log-scale rel_err per hidden state, one line per series) is to replace it.
std::string divergence_section(const std::vector<DivergenceSeries>& series);

}  // namespace nanscope
