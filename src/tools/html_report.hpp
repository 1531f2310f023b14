// A self-contained HTML page (no network, no scripts) for `check --report`: the verdict, the
// causes, a per-layer chart of max |activation| for every run against its dtype's limit, and the
// per-layer tables.
#pragma once

#include <string>
#include <vector>

namespace nanscope {

struct ChartSeries {
  std::string label;            // "fp16 eager"
  double limit = 0;             // the dtype's largest finite value
  std::vector<double> abs_max;  // per hidden-state index; NaN where the state is not finite
};

struct ReportTable {
  std::string title;
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
};

struct HtmlReport {
  std::string title;
  std::string verdict;  // "PASS" | "FAIL"
  std::vector<std::string> summary_lines;
  std::vector<ChartSeries> series;
  std::vector<ReportTable> tables;
};

std::string render_html(const HtmlReport& r);
std::string html_escape(const std::string& s);

}  // namespace nanscope
