#include "tools/html_report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace nanscope {

std::string html_escape(const std::string& s) {
  std::string o;
  o.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        o += "&amp;";
        break;
      case '<':
        o += "&lt;";
        break;
      case '>':
        o += "&gt;";
        break;
      case '"':
        o += "&quot;";
        break;
      default:
        o += c;
    }
  }
  return o;
}

namespace {

constexpr const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                                   "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};

// Log-scale line chart in inline SVG: x = hidden-state index, y = max |activation|. A
// non-finite state is drawn as a cross at the top edge, each dtype's limit as a dashed line.
std::string chart_svg(const std::vector<ChartSeries>& series) {
  const double W = 1000, H = 360, L = 70, R = 290, T = 20, B = 40;
  size_t n = 0;
  double lo = 1e300, hi = 0;
  for (const auto& s : series) {
    n = std::max(n, s.abs_max.size());
    for (double v : s.abs_max)
      if (std::isfinite(v) && v > 0) lo = std::min(lo, v), hi = std::max(hi, v);
  }
  // Limits far above the data (bf16 and fp32, ~3.4e38) would flatten the chart: only limits
  // of fp16 size are drawn; the others are named in the legend.
  for (const auto& s : series)
    if (s.limit > 0 && s.limit <= 1e6) hi = std::max(hi, s.limit);
  if (n == 0 || hi <= 0) return "<p>No hidden states to chart.</p>";
  if (lo > hi) lo = hi / 10;
  const double ylo = std::floor(std::log10(lo)), yhi = std::ceil(std::log10(hi)) + 0.3;
  auto X = [&](double i) { return L + (W - L - R) * (n > 1 ? i / double(n - 1) : 0.5); };
  auto Y = [&](double v) { return T + (H - T - B) * (1 - (std::log10(v) - ylo) / (yhi - ylo)); };
  std::string s = fmt::format(
      "<svg id=\"activation-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" "
      "height=\"{}\" viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"max abs activation per "
      "layer\">\n",
      W, H, W, H);
  s += fmt::format(
      "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#fafafa\" "
      "stroke=\"#ccc\"/>\n",
      L, T, W - L - R, H - T - B);
  const int label_step = std::max(1, int((yhi - ylo) / 8));
  for (int e = int(ylo); e <= int(std::floor(yhi)); e += label_step) {
    const double y = Y(std::pow(10.0, e));
    s += fmt::format(
        "<line x1=\"{}\" x2=\"{}\" y1=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#e4e4e4\"/>"
        "<text x=\"{}\" y=\"{:.1f}\" font-size=\"11\" text-anchor=\"end\">1e{}</text>\n",
        L, W - R, y, y, L - 6, y + 4, e);
  }
  const size_t step = std::max<size_t>(1, n / 12);
  for (size_t i = 0; i < n; i += step)
    s += fmt::format(
        "<text x=\"{:.1f}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\n",
        X(double(i)), H - B + 16, i);
  s += fmt::format(
      "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">hidden state "
      "(0 = embeddings, last = after the final norm)</text>\n",
      L + (W - L - R) / 2, H - 6);
  for (size_t k = 0; k < series.size(); ++k) {
    const auto& se = series[k];
    const char* c = kColors[k % 8];
    std::string pts;
    for (size_t i = 0; i < se.abs_max.size(); ++i) {
      const double v = se.abs_max[i];
      if (std::isfinite(v) && v > 0) {
        pts += fmt::format("{:.1f},{:.1f} ", X(double(i)), Y(v));
      } else {
        if (pts.size())
          s += fmt::format(
              "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n", c, pts);
        pts.clear();
        const double x = X(double(i)), y = T + 6;
        s += fmt::format(
            "<path class=\"nonfinite\" d=\"M{:.1f} {:.1f} l8 8 m0 -8 l-8 8\" stroke=\"{}\" "
            "stroke-width=\"2\"/>\n",
            x - 4, y - 4, c);
      }
    }
    if (pts.size())
      s += fmt::format(
          "<polyline class=\"series\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" "
          "points=\"{}\"/>\n",
          c, pts);
    const bool limit_shown = se.limit > 0 && std::log10(se.limit) <= yhi;
    if (limit_shown) {
      const double y = Y(se.limit);
      s += fmt::format(
          "<line x1=\"{}\" x2=\"{}\" y1=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"{}\" "
          "stroke-dasharray=\"6 4\"/>\n",
          L, W - R, y, y, c);
    }
    const double ly = T + 14 + 18 * double(k);
    s += fmt::format(
        "<line x1=\"{}\" x2=\"{}\" y1=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"{}\" "
        "stroke-width=\"3\"/><text x=\"{}\" y=\"{:.1f}\" font-size=\"12\">{} (limit "
        "{:.4g}{})</text>\n",
        W - R + 10, W - R + 30, ly, ly, c, W - R + 36, ly + 4, html_escape(se.label), se.limit,
        limit_shown ? ", dashed" : ", off chart");
  }
  s += "</svg>\n";
  return s;
}

}  // namespace

std::string render_html(const HtmlReport& r) {
  std::string h =
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>" +
      html_escape(r.title) +
      "</title>\n<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
      ".PASS{color:#1a7f37}.FAIL{color:#cf222e}table{border-collapse:collapse;margin:1em 0}"
      "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
      "th{background:#f3f3f3}code{background:#f3f3f3}</style></head><body>\n";
  h += fmt::format("<h1 id=\"verdict\" class=\"{0}\">{0}</h1>\n<p>{1}</p>\n",
                   html_escape(r.verdict), html_escape(r.title));
  h += "<ul>\n";
  for (const auto& l : r.summary_lines) h += "<li>" + html_escape(l) + "</li>\n";
  h += "</ul>\n<h2>Max |activation| per hidden state</h2>\n";
  h += chart_svg(r.series);
  for (const auto& t : r.tables) {
    h += "<h2>" + html_escape(t.title) + "</h2>\n<table><tr>";
    for (const auto& c : t.header) h += "<th>" + html_escape(c) + "</th>";
    h += "</tr>\n";
    for (const auto& row : t.rows) {
      h += "<tr>";
      for (const auto& c : row) h += "<td>" + html_escape(c) + "</td>";
      h += "</tr>\n";
    }
    h += "</table>\n";
  }
  h += "</body></html>\n";
  return h;
}

}  // namespace nanscope
