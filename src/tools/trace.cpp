#include "tools/trace.hpp"

#include <fmt/format.h>

#include <cmath>
#include <cstring>

#include "common/error.hpp"
#include "formats/safetensors.hpp"

namespace nanscope {

std::optional<DType> parse_run_dtype(std::string_view s) {
  return parse_float_dtype(s);
}

std::string_view run_dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "fp32";
    case DType::BF16:
      return "bf16";
    case DType::F16:
      return "fp16";
    default:
      return dtype_name(t);
  }
}

bool TraceResult::finite() const {
  for (const auto& h : hidden)
    if (!h.stats.finite()) return false;
  return logits.finite() && !first_nonfinite;
}

namespace {

// Watches the run-dtype pass: statistics of every hidden state, the first non-finite site,
// and (with --save) a copy of the hidden states.
class TraceObserver : public Observer {
 public:
  TraceObserver(bool keep, bool peaks) : keep_(keep), peaks_(peaks) {}
  void site(const SiteView& s) override {
    if (peaks_) sites.push_back({s.layer, std::string(s.name), s.peak_abs, s.finite});
    if (first || s.finite) return;
    FirstNonfinite f;
    f.layer = s.layer;
    f.site = std::string(s.name);
    f.shape.assign(s.shape.begin(), s.shape.end());
    f.stats = value_stats(s.values);
    first = std::move(f);
  }
  void hidden_state(int64_t index, std::span<const float> v, int64_t, int64_t) override {
    hidden.push_back({index, value_stats(v)});
    if (keep_) states.emplace_back(v.begin(), v.end());
  }
  std::optional<FirstNonfinite> first;
  std::vector<HiddenStateStats> hidden;
  std::vector<std::vector<float>> states;
  std::vector<SitePeak> sites;

 private:
  bool keep_, peaks_;
};

// The fp32 shadow: waits for one site, notes what it computes, and stops the pass there.
class ShadowObserver : public Observer {
 public:
  ShadowObserver(int64_t layer, std::string site) : layer_(layer), site_(std::move(site)) {}
  void site(const SiteView& s) override {
    if (seen || s.layer != layer_ || s.name != site_) return;
    seen = true;
    finite = s.finite;
    peak = s.peak_abs;
  }
  bool done() const override { return seen; }
  bool seen = false, finite = false;
  double peak = 0;

 private:
  int64_t layer_;
  std::string site_;
};

ForwardResult run(const Checkpoint& ck, const TraceOptions& opt, DType dt, Observer* obs) {
  ForwardOptions fo;
  fo.dtype = dt;
  fo.attention = opt.attention;
  fo.adapter = opt.adapter.get();
  fo.device = opt.device;
  if (opt.embeddings)
    return forward_embeddings(ck, *opt.embeddings,
                              int64_t(opt.embeddings->size()) / ck.config().hidden_size, fo, obs);
  return forward(ck, opt.ids, fo, obs);
}

std::span<const std::byte> as_bytes_of(const void* p, size_t n) {
  return {static_cast<const std::byte*>(p), n};
}

void save(const std::filesystem::path& path, const TraceResult& r,
          const std::vector<std::vector<float>>& states, const std::vector<float>& logits) {
  std::vector<TensorSpec> specs;
  for (size_t i = 0; i < states.size(); ++i)
    specs.push_back({fmt::format("hidden.{}", i), DType::F32, {r.T, r.hidden_size}});
  specs.push_back({"logits", DType::F32, {r.T, r.vocab}});
  if (!r.tokens.empty()) specs.push_back({"input_ids", DType::I64, {r.T}});
  std::map<std::string, std::string> meta = {
      {"format", "pt"},
      {"nanscope.dtype", std::string(run_dtype_name(r.dtype))},
      {"nanscope.attention", std::string(attention_name(r.attention))}};
  SafetensorsWriter w(path, specs, meta);
  for (const auto& s : states) w.write(as_bytes_of(s.data(), s.size() * sizeof(float)));
  w.write(as_bytes_of(logits.data(), logits.size() * sizeof(float)));
  if (!r.tokens.empty()) w.write(as_bytes_of(r.tokens.data(), r.tokens.size() * sizeof(int64_t)));
  w.commit();
}

}  // namespace

TraceResult trace(const Checkpoint& ck, const TraceOptions& opt) {
  const ModelConfig& c = ck.config();
  if (opt.embeddings) {
    if (opt.embeddings->empty() || opt.embeddings->size() % size_t(c.hidden_size) != 0)
      fail("trace: input embeddings hold {} values, not a whole number of rows of {}",
           opt.embeddings->size(), c.hidden_size);
  } else if (opt.ids.empty()) {
    fail("trace: no input tokens (give --ids or --text)");
  }
  TraceResult r;
  r.dtype = opt.dtype;
  if (opt.adapter) r.adapter = opt.adapter->adapter().dir().string();
  r.attention = opt.attention;
  if (!opt.embeddings) r.tokens = opt.ids;
  r.hidden_size = c.hidden_size;
  r.vocab = c.vocab_size;
  r.layers = c.num_hidden_layers;

  TraceObserver obs(opt.save.has_value(), opt.site_peaks);
  ForwardResult fr = run(ck, opt, opt.dtype, &obs);
  r.T = fr.tokens;
  r.hidden = std::move(obs.hidden);
  r.logits = value_stats(fr.logits);
  r.first_nonfinite = std::move(obs.first);
  r.sites = std::move(obs.sites);
  r.weight_bytes = fr.weight_bytes;

  if (r.first_nonfinite && opt.shadow_fp32) {
    FirstNonfinite& f = *r.first_nonfinite;
    if (opt.dtype == DType::F32) {
      f.finite_in_fp32 = false;  // the fp32 run is this run: it is non-finite there too
    } else {
      ShadowObserver shadow(f.layer, f.site);
      run(ck, opt, DType::F32, &shadow);
      f.finite_in_fp32 = shadow.seen && shadow.finite;
      if (f.finite_in_fp32) f.value_fp32 = shadow.peak;
    }
  }
  if (opt.save) save(*opt.save, r, obs.states, fr.logits);
  return r;
}

namespace {

nlohmann::json num(double v, bool present = true) {
  if (!present || !std::isfinite(v)) return nullptr;
  return v;
}

nlohmann::json stats_json(const ValueStats& s) {
  return {{"finite", s.finite()},
          {"min", num(s.min, s.any_finite)},
          {"max", num(s.max, s.any_finite)},
          {"abs_max", num(s.abs_max, s.any_finite)},
          {"nan", s.nan},
          {"inf", s.inf}};
}

std::string status(const ValueStats& s) {
  if (s.finite()) return "[OK]";
  std::string out = "[FAIL:";
  if (s.nan) out += fmt::format(" {} NaN", s.nan);
  if (s.inf) out += fmt::format(" {} inf", s.inf);
  return out + "]";
}

std::string minmax(const ValueStats& s) {
  if (!s.any_finite) return "min=nan max=nan";
  return fmt::format("min={:.4g} max={:.4g}", s.min, s.max);
}

}  // namespace

nlohmann::json trace_json(const TraceResult& r) {
  nlohmann::json j;
  j["dtype"] = run_dtype_name(r.dtype);
  j["attention"] = attention_name(r.attention);
  j["tokens"] = r.tokens;
  nlohmann::json hidden = nlohmann::json::array();
  for (const auto& h : r.hidden) {
    nlohmann::json e = stats_json(h.stats);
    e["index"] = h.index;
    hidden.push_back(std::move(e));
  }
  j["hidden"] = std::move(hidden);
  j["logits"] = stats_json(r.logits);
  j["weight_bytes"] = r.weight_bytes;
  j["adapter"] = r.adapter.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.adapter);
  if (r.first_nonfinite) {
    const FirstNonfinite& f = *r.first_nonfinite;
    j["first_nonfinite"] = {{"layer", f.layer},
                            {"site", f.site},
                            {"value_fp32", f.value_fp32 ? num(*f.value_fp32) : nullptr},
                            {"finite_in_fp32", f.finite_in_fp32},
                            {"shape", f.shape},
                            {"nan", f.stats.nan},
                            {"inf", f.stats.inf}};
  } else {
    j["first_nonfinite"] = nullptr;
  }
  return j;
}

std::string trace_text(const TraceResult& r) {
  std::string out =
      fmt::format("Trace in {} ({} attention), {} tokens, {} hidden states\n",
                  run_dtype_name(r.dtype), attention_name(r.attention), r.T, r.hidden.size());
  if (!r.adapter.empty()) out += fmt::format("Adapter {} applied unmerged (as PeftModel)\n", r.adapter);
  for (const auto& h : r.hidden)
    out += fmt::format("  Layer {}: [1, {}, {}] {} {}\n", h.index, r.T, r.hidden_size,
                       minmax(h.stats), status(h.stats));
  out +=
      fmt::format("Logits: [1, {}, {}] {} {}\n", r.T, r.vocab, minmax(r.logits), status(r.logits));
  if (!r.first_nonfinite) {
    out += "All finite.\n";
    return out;
  }
  const FirstNonfinite& f = *r.first_nonfinite;
  out += fmt::format("First non-finite site: {} [{}] ({} NaN, {} inf)\n", f.site,
                     fmt::join(f.shape, ", "), f.stats.nan, f.stats.inf);
  if (r.dtype != DType::F32 && f.value_fp32) {
    if (f.finite_in_fp32)
      out += fmt::format("  in fp32 this site is finite, reaching |x| = {:.4g}{}\n", *f.value_fp32,
                         r.dtype == DType::F16 && *f.value_fp32 > 65504
                             ? " (beyond fp16's 65504: an overflow of the run dtype)"
                             : "");
    else
      out += "  it is non-finite in fp32 too: the weights or inputs hold the NaN/inf\n";
  }
  return out;
}

}  // namespace nanscope
