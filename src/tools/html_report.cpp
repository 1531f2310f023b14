#include "tools/html_report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>

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

std::string g(double v) {
  return fmt::format("{:.3g}", v);
}

// A dtype's limit as people quote it: 65504, 3.39e+38.
std::string limit_text(double v) {
  return v < 1e6 ? fmt::format("{:.0f}", v) : fmt::format("{:.3g}", v);
}

// How far below a limit, in words a reader compares at a glance.
std::string below_text(double ratio) {
  if (!(ratio > 0)) return "zero";
  if (ratio < 1e-6) return "far below";  // bf16 / fp32 headroom: 30 decades say nothing more
  return fmt::format("{}x below", g(1 / ratio));
}

// Colour of a cell from its headroom h = log10(limit / peak), in decades: dark red at the
// limit, through orange to near white nine decades below it. Stops chosen so that fp16's usual
// 1e2..1e4 activations read as warm and bf16's 30 decades of room as blank.
struct Stop {
  double h;
  std::array<int, 3> rgb;
};
constexpr Stop kStops[] = {{0, {0xb3, 0x00, 0x00}}, {1, {0xe3, 0x4a, 0x33}},
                           {2, {0xfc, 0x8d, 0x59}}, {3, {0xfd, 0xbb, 0x84}},
                           {4, {0xfd, 0xd4, 0x9e}}, {6, {0xfe, 0xf0, 0xd9}},
                           {9, {0xf7, 0xf7, 0xf7}}};
constexpr const char* kOverColour = "#3f0010";  // beyond the limit: the run dtype cannot hold it

std::string hex(const std::array<int, 3>& c) {
  return fmt::format("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
}

std::string headroom_colour(double h) {
  if (h < 0) return kOverColour;
  constexpr size_t n = sizeof(kStops) / sizeof(kStops[0]);
  if (!(h < kStops[n - 1].h)) return hex(kStops[n - 1].rgb);
  for (size_t i = 1; i < n; ++i)
    if (h < kStops[i].h) {
      const double t = (h - kStops[i - 1].h) / (kStops[i].h - kStops[i - 1].h);
      std::array<int, 3> c{};
      for (int k = 0; k < 3; ++k)
        c[size_t(k)] =
            int(std::lround(kStops[i - 1].rgb[size_t(k)] +
                            t * (kStops[i].rgb[size_t(k)] - kStops[i - 1].rgb[size_t(k)])));
      return hex(c);
    }
  return hex(kStops[n - 1].rgb);
}

std::string legend_gradient() {
  std::string s = "linear-gradient(to right";
  for (const auto& st : kStops) s += fmt::format(",{} {:.1f}%", hex(st.rgb), st.h / 9.0 * 100);
  return s + ")";
}

// "model.layers.3.self_attn.scores" -> "self_attn.scores"; sites outside a layer keep their name.
std::string layer_suffix(const std::string& site, int64_t layer) {
  if (layer < 0) return site;
  const std::string key = fmt::format("layers.{}.", layer);
  const size_t p = site.find(key);
  return p == std::string::npos ? site : site.substr(p + key.size());
}

std::string short_label(const std::string& suffix) {
  static const std::map<std::string, std::string> names = {
      {"input_layernorm", "in_norm"},
      {"post_attention_layernorm", "post_norm"},
      {"pre_feedforward_layernorm", "pre_ff_norm"},
      {"post_feedforward_layernorm", "post_ff_norm"},
      {"residual_attn", "resid_attn"},
      {"residual_mlp", "resid_mlp"},
      {"model.embed_tokens", "embed"},
      {"model.norm", "norm"},
      {"lm_head", "lm_head"}};
  if (auto it = names.find(suffix); it != names.end()) return it->second;
  for (std::string_view pre : {"self_attn.", "mlp."})
    if (suffix.starts_with(pre)) return suffix.substr(pre.size());
  return suffix;
}

struct Cell {
  std::string site;  // the full name, as the forward pass reports it
  double peak = 0;
  bool finite = true;
};

// The fp32 sites as a grid: columns = the per-layer sites in the order they are computed, rows =
// model.embed_tokens, the layers, then model.norm and lm_head (one cell each).
struct Grid {
  std::vector<std::string> columns;                       // suffixes
  std::vector<std::string> before, after;                 // sites outside the layers
  std::map<std::string, Cell> outside;                    // by site name
  std::map<int64_t, std::map<std::string, Cell>> layers;  // layer -> suffix -> cell
};

Grid make_grid(const std::vector<SitePeak>& sites) {
  Grid gr;
  int64_t prev_layer = -2;
  std::string prev;  // the previous site of the same layer
  for (const auto& s : sites) {
    Cell* c;
    if (s.layer < 0) {
      if (!gr.outside.count(s.site)) (gr.layers.empty() ? gr.before : gr.after).push_back(s.site);
      c = &gr.outside[s.site];
    } else {
      const std::string suf = layer_suffix(s.site, s.layer);
      if (s.layer != prev_layer) prev.clear();
      prev_layer = s.layer;
      // A site first seen in a later layer (a dense MLP after MoE layers) goes right after the
      // site computed before it, so that columns stay in the order of the computation.
      if (std::find(gr.columns.begin(), gr.columns.end(), suf) == gr.columns.end()) {
        auto at = prev.empty() ? gr.columns.begin()
                               : std::find(gr.columns.begin(), gr.columns.end(), prev) + 1;
        gr.columns.insert(at, suf);
      }
      prev = suf;
      auto& row = gr.layers[s.layer];
      const bool fresh = !row.count(suf);
      c = &row[suf];
      if (!fresh) {  // a site reported twice in a layer (MoE experts): the worst of them
        c->peak = std::max(c->peak, s.peak_abs);
        c->finite = c->finite && s.finite;
        continue;
      }
    }
    c->site = s.site;
    c->peak = s.peak_abs;
    c->finite = s.finite;
  }
  return gr;
}

double limit_at(const ReportRun& run, const std::string& suffix) {
  const bool in_fp32 =
      std::find(run.fp32_sites.begin(), run.fp32_sites.end(), suffix) != run.fp32_sites.end();
  return in_fp32 ? double(dtype_max(DType::F32)) : run.limit;
}

std::string cell_html(const ReportRun& run, int64_t layer, const std::string& site,
                      const std::string& suffix, const Cell& c) {
  const double limit = limit_at(run, suffix);
  const bool first = run.first_nonfinite && run.first_nonfinite->first == layer &&
                     run.first_nonfinite->second == site;
  const double ratio = c.peak / limit;
  std::string cls = "c", colour, what;
  if (!c.finite) {
    cls += " nan";
    what = fmt::format("non-finite in fp32 too (finite part up to |x| = {})", g(c.peak));
  } else if (c.peak > limit) {
    cls += " over";
    colour = kOverColour;
    what = fmt::format("fp32 |x| = {}, {}x {}'s limit {}", g(c.peak), g(ratio),
                       limit == run.limit ? run.dtype : "fp32", limit_text(limit));
  } else {
    colour = headroom_colour(c.peak > 0 ? std::log10(limit / c.peak) : 1e9);
    what = fmt::format(
        "fp32 |x| = {}, {}x below {}'s limit {}", g(c.peak), c.peak > 0 ? g(limit / c.peak) : "inf",
        limit == run.limit ? run.dtype : "fp32 (kept in fp32 here)", limit_text(limit));
  }
  if (first) cls += " first";
  const std::string where = layer >= 0 ? fmt::format("layer {} {}", layer, suffix) : site;
  return fmt::format(
      "<td class=\"{}\" data-layer=\"{}\" data-site=\"{}\" data-peak=\"{}\" data-ratio=\"{}\"{} "
      "title=\"{}: {}{}\">{}</td>",
      cls, layer, html_escape(site), c.peak, ratio,
      colour.empty() ? "" : fmt::format(" style=\"background:{}\"", colour), html_escape(where),
      what, first ? fmt::format("; the first non-finite site of {}", html_escape(run.label)) : "",
      first ? "&#x2715;" : "");
}

std::string panel_html(const Grid& gr, const ReportRun& run, size_t index) {
  std::string status;
  if (!run.ran)
    status = "<span class=\"st bad\">not run</span>";
  else if (run.first_nonfinite)
    status = fmt::format(
        "<span class=\"st bad\">&#x2715; first non-finite: {}</span>",
        html_escape(run.first_nonfinite->first >= 0
                        ? fmt::format("layer {} {}", run.first_nonfinite->first,
                                      short_label(layer_suffix(run.first_nonfinite->second,
                                                               run.first_nonfinite->first)))
                        : run.first_nonfinite->second));
  else if (!run.finite)
    status = "<span class=\"st bad\">non-finite output</span>";
  else
    status = "<span class=\"st ok\">finite</span>";
  std::string h = fmt::format(
      "<figure class=\"panel\" id=\"map-{}\" data-run=\"{}\" data-limit=\"{}\">\n"
      "<figcaption><b>{}</b> <span class=\"lim\">limit {}</span> {}</figcaption>\n"
      "<div class=\"mapwrap\"><table class=\"heat\">\n<thead><tr><th class=\"corner\">layer</th>",
      index, html_escape(run.label), run.limit, html_escape(run.label), limit_text(run.limit),
      status);
  for (const auto& c : gr.columns)
    h += fmt::format("<th class=\"col\" title=\"{}\"><span>{}</span></th>", html_escape(c),
                     html_escape(short_label(c)));
  h += "</tr></thead>\n<tbody>\n";
  const size_t span = std::max<size_t>(gr.columns.size(), 1);
  auto outside_row = [&](const std::string& site) {
    std::string row =
        fmt::format("<tr class=\"outside\"><th>{}</th>", html_escape(short_label(site)));
    row += cell_html(run, -1, site, site, gr.outside.at(site));
    if (span > 1)
      row += fmt::format("<td class=\"name\" colspan=\"{}\">{}</td>", span - 1, html_escape(site));
    return row + "</tr>\n";
  };
  for (const auto& s : gr.before) h += outside_row(s);
  for (const auto& [layer, row] : gr.layers) {
    h += fmt::format("<tr><th>{}</th>", layer);
    for (const auto& c : gr.columns) {
      auto it = row.find(c);
      if (it == row.end()) {
        h += "<td class=\"none\"></td>";
        continue;
      }
      h += cell_html(run, layer, it->second.site, c, it->second);
    }
    h += "</tr>\n";
  }
  for (const auto& s : gr.after) h += outside_row(s);
  h += "</tbody></table></div>\n</figure>\n";
  return h;
}

// The sites closest to (or beyond) a run's limit, with the figures the colours stand for.
std::string closest_table(const Grid& gr, const std::vector<const ReportRun*>& runs) {
  struct Row {
    int64_t layer;
    std::string suffix;
    Cell cell;
    double worst;
  };
  std::vector<Row> rows;
  auto add = [&](int64_t layer, const std::string& suffix, const Cell& c) {
    if (!c.finite) return;  // non-finite in fp32: no distance to a limit to speak of
    double worst = 0;
    for (const auto* r : runs) worst = std::max(worst, c.peak / limit_at(*r, suffix));
    rows.push_back({layer, suffix, c, worst});
  };
  for (const auto& s : gr.before) add(-1, s, gr.outside.at(s));
  for (const auto& [layer, row] : gr.layers)
    for (const auto& [suf, c] : row) add(layer, suf, c);
  for (const auto& s : gr.after) add(-1, s, gr.outside.at(s));
  std::stable_sort(rows.begin(), rows.end(),
                   [](const Row& a, const Row& b) { return a.worst > b.worst; });
  rows.resize(std::min<size_t>(rows.size(), 10));
  if (rows.empty()) return "";
  std::string h =
      "<h3>Closest to a limit</h3>\n<div class=\"scroll\"><table class=\"plain\" "
      "id=\"closest\"><tr><th>layer</th><th>site</th><th>fp32 |x|</th>";
  for (const auto* r : runs) h += "<th>" + html_escape(r->label) + "</th>";
  h += "</tr>\n";
  for (const auto& row : rows) {
    h += fmt::format("<tr><td>{}</td><td><code>{}</code></td><td>{}</td>",
                     row.layer >= 0 ? std::to_string(row.layer) : "", html_escape(row.suffix),
                     g(row.cell.peak));
    for (const auto* r : runs) {
      const double ratio = row.cell.peak / limit_at(*r, row.suffix);
      h += ratio >= 1 ? fmt::format("<td class=\"overtxt\">{}x over</td>", g(ratio))
                      : fmt::format("<td>{}</td>", below_text(ratio));
    }
    h += "</tr>\n";
  }
  return h + "</table></div>\n";
}

constexpr const char* kStyle = R"(
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2328;background:#fff}
main{max-width:1140px;margin:0 auto;padding:20px 24px 40px}
h1{margin:0;font-size:2.4em;letter-spacing:.04em}
h2{font-size:1.3em;margin:1.6em 0 .5em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
.PASS{color:#1a7f37}.FAIL{color:#cf222e}
.subject{margin:.2em 0 0;font-size:1.05em;overflow-wrap:anywhere}
code,.code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.9em;overflow-wrap:anywhere}
.causes{list-style:none;margin:0;padding:0;display:grid;gap:12px}
.cause{border:1px solid #d0d7de;border-left:6px solid #cf222e;border-radius:6px;padding:12px 16px;background:#fff8f8}
.cause .kind{font-weight:600;overflow-wrap:anywhere}
.cause .where{font-weight:400;color:#57606a;font-size:.92em;overflow-wrap:anywhere}
.cause p{margin:.4em 0 0;overflow-wrap:anywhere}
.cause .fix{background:#dafbe1;border-radius:4px;padding:6px 10px}
.pass{border-left:6px solid #1a7f37;border:1px solid #d0d7de;border-radius:6px;padding:12px 16px;background:#f6fff8}
dl.facts{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:4px 16px;margin:0}
dl.facts dt{font-weight:600;color:#57606a}
dl.facts dd{margin:0;overflow-wrap:anywhere;min-width:0}
ul.runs{margin:0;padding-left:1.2em}
ul.runs li{overflow-wrap:anywhere}
.st{font-size:.85em;padding:1px 8px;border-radius:10px;white-space:nowrap}
.st.ok{background:#dafbe1;color:#116329}.st.bad{background:#ffebe9;color:#a40e26}
.legend{display:flex;flex-wrap:wrap;align-items:center;gap:6px 14px;font-size:.85em;margin:.6em 0 1em}
.legend .bar{display:inline-block;width:220px;max-width:60vw;height:12px;border:1px solid #bbb;vertical-align:middle}
.legend .ticks{display:flex;justify-content:space-between;width:220px;max-width:60vw;font-size:.8em;color:#57606a}
.sw{display:inline-block;width:14px;height:14px;border:1px solid #999;vertical-align:middle;text-align:center;line-height:12px;font-size:11px}
.sw.over{background:#3f0010}.sw.first{background:#fff;outline:2px solid #000;outline-offset:-2px}
.sw.nan{background:repeating-linear-gradient(45deg,#000 0 3px,#777 3px 6px)}
.panels{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,500px),1fr));gap:20px}
figure.panel{margin:0;min-width:0}
figure.panel figcaption{margin-bottom:4px;overflow-wrap:anywhere}
.lim{color:#57606a;font-size:.85em}
.mapwrap{overflow-x:auto}
table.heat{border-collapse:collapse;table-layout:fixed;width:100%}
table.heat th{font-weight:400;font-size:11px;color:#57606a;padding:0 3px 0 0;text-align:right;white-space:nowrap}
table.heat th.corner{width:4em;vertical-align:bottom}
table.heat th.col{text-align:left;vertical-align:bottom;padding:0 0 2px 0;height:6.2em}
table.heat th.col span{writing-mode:vertical-rl;transform:rotate(180deg);display:inline-block}
table.heat td{height:15px;padding:0;border:1px solid #fff;font-size:11px;text-align:center;line-height:13px}
table.heat td.c.over{color:#fff}
table.heat td.c.nan{background:repeating-linear-gradient(45deg,#000 0 3px,#777 3px 6px)}
table.heat td.c.first{outline:2px solid #000;outline-offset:-2px;font-weight:700;color:#fff;background-clip:padding-box}
table.heat td.none{background:#fff}
table.heat td.name{font-size:10px;color:#8c959f;text-align:left;padding-left:4px;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
.scroll{overflow-x:auto;max-width:100%}
table.plain{border-collapse:collapse;margin:.4em 0;font-size:13px}
table.plain td,table.plain th{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top;white-space:nowrap}
table.plain code{overflow-wrap:normal}
table.plain th{background:#f6f8fa}
.overtxt{color:#a40e26;font-weight:600}
details{margin-top:1.6em}
summary{cursor:pointer;font-weight:600}
footer{margin-top:2.4em;color:#57606a;font-size:.85em;overflow-wrap:anywhere}
@media (max-width:600px){
 main{padding:12px 12px 32px}
 h1{font-size:1.9em}
 dl.facts{grid-template-columns:minmax(0,1fr);gap:0}
 dl.facts dd{margin-bottom:6px}
 .cause{padding:10px 12px}
 table.heat th.corner{width:3.6em}
}
)";

}  // namespace

std::string heat_map_section(const std::vector<SitePeak>& sites,
                             const std::vector<ReportRun>& runs) {
  std::string h =
      "<section id=\"heatmaps\">\n<h2>Where the values go: peak |x| per site in fp32, against "
      "each run's limit</h2>\n";
  if (sites.empty())
    return h +
           "<p>No fp32 reference run (the checkpoint could not be run): nothing to draw.</p>\n"
           "</section>\n";
  h += "<p>Each cell is one site of one layer: the largest |value| the fp32 reference computes "
       "there (for eager attention scores, the unscaled q&middot;k<sup>T</sup> that a 16-bit run "
       "holds before scaling), coloured by how far it stays below the run's largest finite "
       "value. &#x2715; marks the first site that went non-finite in that run.</p>\n";
  h += fmt::format(
      "<div class=\"legend\"><span><span class=\"bar\" style=\"background:{}\"></span>"
      "<span class=\"ticks\"><span>at limit</span><span>10<sup>3</sup>x below</span>"
      "<span>10<sup>6</sup>x</span><span>10<sup>9</sup>x</span></span></span>"
      "<span><span class=\"sw over\"></span> over the limit</span>"
      "<span><span class=\"sw first\">&#x2715;</span> first non-finite site of the run</span>"
      "<span><span class=\"sw nan\"></span> non-finite in fp32 too</span></div>\n",
      legend_gradient());
  const Grid gr = make_grid(sites);
  // Failing runs first: they are what the reader came for.
  std::vector<size_t> order;
  for (size_t i = 0; i < runs.size(); ++i)
    if (runs[i].ran && !runs[i].finite) order.push_back(i);
  for (size_t i = 0; i < runs.size(); ++i)
    if (!(runs[i].ran && !runs[i].finite)) order.push_back(i);
  h += "<div class=\"panels\">\n";
  for (size_t i : order) h += panel_html(gr, runs[i], i);
  h += "</div>\n";
  std::vector<const ReportRun*> ran;
  for (size_t i : order)
    if (runs[i].ran) ran.push_back(&runs[i]);
  h += closest_table(gr, ran);
  return h + "</section>\n";
}

std::string divergence_section(const std::vector<DivergenceSeries>& series) {
  if (series.empty()) return "";
  size_t n = 0;
  for (const auto& s : series) n = std::max(n, s.rel_err.size());
  std::string h = "<section id=\"divergence\">\n<h2>Divergence per layer</h2>\n";
  // One bar per hidden state and series, log scale from 1e-8 (rounding) to 1e2 (unrelated
  // states); a state that is not finite gets a full bar in the alarm colour.
  const double W = 600, H = 180, left = 40, bottom = 20;
  const double slot = (W - left) / double(std::max<size_t>(n, 1));
  const double bar = std::max(1.0, slot / double(series.size()) - 1);
  h += fmt::format(
      "<svg class=\"divchart\" viewBox=\"0 0 {} {}\" width=\"100%\" role=\"img\" "
      "aria-label=\"relative error per hidden state\">\n",
      W, H + bottom);
  for (int e = -8; e <= 2; e += 2) {
    const double y = H - (double(e) + 8) / 10 * H;
    h += fmt::format(
        "<line x1=\"{0}\" x2=\"{1}\" y1=\"{2:.1f}\" y2=\"{2:.1f}\" stroke=\"#ddd\"/><text "
        "x=\"2\" y=\"{3:.1f}\" font-size=\"10\">1e{4}</text>\n",
        left, W, y, y + 3, e);
  }
  const char* colours[] = {"#3b6ea5", "#c77c1e", "#5a9e4b", "#8a4fa3"};
  for (size_t k = 0; k < series.size(); ++k)
    for (size_t i = 0; i < series[k].rel_err.size(); ++i) {
      const double v = series[k].rel_err[i];
      const bool bad = !std::isfinite(v);
      const double l = bad ? 2 : std::clamp(std::log10(std::max(v, 1e-12)), -8.0, 2.0);
      const double top = H - (l + 8) / 10 * H;
      h += fmt::format(
          "<rect class=\"{}\" x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" "
          "fill=\"{}\"><title>state {}: {}</title></rect>\n",
          bad ? "divbar nonfinite" : "divbar", left + double(i) * slot + double(k) * (bar + 1), top,
          bar, H - top, bad ? "#b00020" : colours[k % 4], i, bad ? "not finite" : g(v));
    }
  h += fmt::format("<text x=\"{}\" y=\"{}\" font-size=\"10\">hidden state 0 .. {}</text>\n",
                   left, H + 14, n ? n - 1 : 0);
  h += "</svg>\n<details><summary>Figures</summary><div class=\"scroll\">"
       "<table class=\"plain\"><tr><th>hidden state</th>";
  for (const auto& s : series) h += "<th>" + html_escape(s.label) + " rel_err</th>";
  h += "</tr>\n";
  for (size_t i = 0; i < n; ++i) {
    h += fmt::format("<tr><td>{}</td>", i);
    for (const auto& s : series)
      h += i < s.rel_err.size()
               ? (std::isfinite(s.rel_err[i]) ? "<td>" + g(s.rel_err[i]) + "</td>"
                                              : "<td class=\"overtxt\">not finite</td>")
               : "<td></td>";
    h += "</tr>\n";
  }
  return h + "</table></div></details>\n</section>\n";
}

std::string render_html(const HtmlReport& r) {
  std::string h =
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
      "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
      "<title>" +
      html_escape(r.title) + "</title>\n<style>" + kStyle + "</style></head><body><main>\n";
  h += fmt::format(
      "<header><h1 id=\"verdict\" class=\"{0}\">{0}</h1>\n<p class=\"subject\">{1}</p></header>\n",
      html_escape(r.verdict), html_escape(r.subject));

  h += "<section id=\"causes\">\n";
  if (r.causes.empty()) {
    h += "<h2>No cause found</h2>\n<div class=\"pass\">The structure matches config.json, every "
         "weight is finite, and every run stayed finite.</div>\n";
  } else {
    h += fmt::format("<h2>{} and what to do</h2>\n<ol class=\"causes\">\n",
                     r.causes.size() == 1 ? "The cause"
                                          : fmt::format("{} causes, in order of "
                                                        "origin,",
                                                        r.causes.size()));
    for (size_t i = 0; i < r.causes.size(); ++i) {
      const auto& c = r.causes[i];
      h += fmt::format(
          "<li class=\"cause\" data-kind=\"{0}\"><div class=\"kind\">{1}. {0}{2}</div>\n"
          "<p class=\"detail\">{3}</p>\n<p class=\"fix\"><b>Fix:</b> {4}</p></li>\n",
          html_escape(c.kind), i + 1,
          c.where.empty() ? "" : " <span class=\"where\">" + html_escape(c.where) + "</span>",
          html_escape(c.detail), html_escape(c.fix));
    }
    h += "</ol>\n";
  }
  h += "</section>\n";

  h += "<section id=\"facts\">\n<h2>What was checked</h2>\n<dl class=\"facts\">\n";
  for (const auto& f : r.facts)
    h += fmt::format("<dt>{}</dt><dd{}>{}</dd>\n", html_escape(f.name),
                     f.code ? " class=\"code\"" : "", html_escape(f.value));
  h += "</dl>\n</section>\n";

  h += "<section id=\"runs\">\n<h2>Runs</h2>\n<ul class=\"runs\">\n";
  for (const auto& run : r.runs)
    h += fmt::format("<li><b>{}</b> <span class=\"st {}\">{}</span> {}</li>\n",
                     html_escape(run.label), run.ran && run.finite ? "ok" : "bad",
                     !run.ran     ? "not run"
                     : run.finite ? "finite"
                                  : "non-finite",
                     html_escape(run.summary));
  h += "</ul>\n</section>\n";

  h += heat_map_section(r.fp32_sites, r.runs);
  h += divergence_section(r.divergence);

  for (const auto& t : r.tables) {
    h += "<details><summary>" + html_escape(t.title) +
         "</summary>\n<div class=\"scroll\"><table class=\"plain\"><tr>";
    for (const auto& c : t.header) h += "<th>" + html_escape(c) + "</th>";
    h += "</tr>\n";
    for (const auto& row : t.rows) {
      h += "<tr>";
      for (const auto& c : row) h += "<td>" + html_escape(c) + "</td>";
      h += "</tr>\n";
    }
    h += "</table></div></details>\n";
  }
  h += "<footer>";
  for (const auto& f : r.facts)
    if (f.name == "nanscope" || f.name == "Date") h += html_escape(f.name + " " + f.value) + " · ";
  h += "a self-contained page: no scripts, nothing fetched.</footer>\n";
  h += "</main></body></html>\n";
  return h;
}

}  // namespace nanscope
