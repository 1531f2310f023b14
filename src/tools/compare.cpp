// Two runs on one input, compared state by state (compare.hpp).
#include "tools/compare.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/error.hpp"

namespace nanscope {

namespace {

class States : public Observer {
 public:
  void hidden_state(int64_t, std::span<const float> v, int64_t, int64_t) override {
    all.emplace_back(v.begin(), v.end());
  }
  bool wants_sites() const override { return false; }
  std::vector<std::vector<float>> all;
};

bool finite(std::span<const float> v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

nlohmann::json num(double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(); }

// log-softmax of one row in double.
void log_softmax(const float* x, int64_t V, std::vector<double>& out) {
  out.resize(size_t(V));
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < V; ++i) m = std::max(m, double(x[i]));
  double s = 0;
  for (int64_t i = 0; i < V; ++i) s += std::exp(double(x[i]) - m);
  const double lse = m + std::log(s);
  for (int64_t i = 0; i < V; ++i) out[size_t(i)] = double(x[i]) - lse;
}

}  // namespace

StateDiff diff_states(std::span<const float> a, std::span<const float> b) {
  StateDiff d;
  if (a.size() != b.size() || !finite(a) || !finite(b)) {
    d.finite = false;
    return d;
  }
  double num2 = 0, den = 0, dot = 0, na = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = a[i], y = b[i];
    num2 += (x - y) * (x - y);
    den += y * y;
    na += x * x;
    dot += x * y;
    d.max_abs_diff = std::max(d.max_abs_diff, std::fabs(x - y));
  }
  d.rel_err = den > 0 ? std::sqrt(num2 / den) : std::sqrt(num2);
  d.cosine = na > 0 && den > 0 ? dot / std::sqrt(na * den) : (na == den ? 1.0 : 0.0);
  return d;
}

double next_token_nll(std::span<const float> logits, std::span<const int64_t> ids, int64_t V) {
  const int64_t T = int64_t(ids.size());
  if (T < 2) return std::numeric_limits<double>::quiet_NaN();
  std::vector<double> lp;
  double s = 0;
  for (int64_t t = 0; t + 1 < T; ++t) {
    log_softmax(logits.data() + t * V, V, lp);
    s -= lp[size_t(ids[size_t(t + 1)])];
  }
  return s / double(T - 1);
}

CompareResult compare(const CompareSide& a, const CompareSide& b, std::span<const int64_t> ids,
                      int64_t generate_tokens) {
  const ModelConfig &ca = a.ck->config(), &cb = b.ck->config();
  if (ca.hidden_size != cb.hidden_size || ca.num_hidden_layers != cb.num_hidden_layers ||
      ca.vocab_size != cb.vocab_size)
    fail(
        "compare: {} and {} cannot be compared state by state: hidden_size {} vs {}, "
        "num_hidden_layers {} vs {}, vocab_size {} vs {}",
        a.ck->dir().string(), b.ck->dir().string(), ca.hidden_size, cb.hidden_size,
        ca.num_hidden_layers, cb.num_hidden_layers, ca.vocab_size, cb.vocab_size);
  if (ids.empty()) fail("compare: no input tokens (give --ids or --text)");
  CompareResult r;
  r.label_a = a.label;
  r.label_b = b.label;
  r.tokens = int64_t(ids.size());
  auto run = [&](const CompareSide& s, States& obs) {
    ForwardOptions fo;
    fo.dtype = s.dtype;
    fo.attention = s.attention;
    fo.adapter = s.adapter.get();
    fo.device = s.device;
    return forward(*s.ck, ids, fo, &obs);
  };
  States sa, sb;
  const ForwardResult fa = run(a, sa);
  const ForwardResult fb = run(b, sb);
  const int64_t V = ca.vocab_size;
  for (size_t i = 0; i < sa.all.size() && i < sb.all.size(); ++i) {
    StateDiff d = diff_states(sa.all[i], sb.all[i]);
    d.index = int64_t(i);
    r.finite_a = r.finite_a && finite(sa.all[i]);
    r.finite_b = r.finite_b && finite(sb.all[i]);
    r.states.push_back(d);
  }
  r.finite_a = r.finite_a && finite(fa.logits);
  r.finite_b = r.finite_b && finite(fb.logits);
  r.logits_finite = finite(fa.logits) && finite(fb.logits);
  r.nll_a = next_token_nll(fa.logits, ids, V);
  r.nll_b = next_token_nll(fb.logits, ids, V);
  if (r.logits_finite) {
    r.logits_rel_err = diff_states(fa.logits, fb.logits).rel_err;
    std::vector<double> la, lb;
    int64_t agree = 0;
    double kl = 0;
    for (int64_t t = 0; t < r.tokens; ++t) {
      log_softmax(fa.logits.data() + t * V, V, la);
      log_softmax(fb.logits.data() + t * V, V, lb);
      double k = 0;
      for (int64_t v = 0; v < V; ++v) k += std::exp(lb[size_t(v)]) * (lb[size_t(v)] - la[size_t(v)]);
      kl += k;
      const auto ia = std::max_element(la.begin(), la.end()) - la.begin();
      const auto ib = std::max_element(lb.begin(), lb.end()) - lb.begin();
      agree += ia == ib;
    }
    r.kl = kl / double(r.tokens);
    r.top1_agreement = double(agree) / double(r.tokens);
  }
  if (generate_tokens > 0) {
    auto gen = [&](const CompareSide& s) {
      GenerateOptions go;
      go.prompt.assign(ids.begin(), ids.end());
      go.max_new_tokens = generate_tokens;
      go.dtype = s.dtype;
      go.attention = s.attention;
      go.adapter = s.adapter;
      go.device = s.device;
      return generate(*s.ck, go);
    };
    r.gen_a = gen(a);
    r.gen_b = gen(b);
    while (size_t(r.agree) < r.gen_a->ids.size() && size_t(r.agree) < r.gen_b->ids.size() &&
           r.gen_a->ids[size_t(r.agree)] == r.gen_b->ids[size_t(r.agree)])
      ++r.agree;
  }
  return r;
}

nlohmann::json compare_json(const CompareResult& r) {
  nlohmann::json j;
  j["a"] = r.label_a;
  j["b"] = r.label_b;
  j["tokens"] = r.tokens;
  nlohmann::json st = nlohmann::json::array();
  for (const StateDiff& d : r.states) {
    nlohmann::json e = {{"index", d.index}, {"finite", d.finite}};
    e["rel_err"] = d.finite ? num(d.rel_err) : nlohmann::json();
    e["cosine"] = d.finite ? num(d.cosine) : nlohmann::json();
    e["max_abs_diff"] = d.finite ? num(d.max_abs_diff) : nlohmann::json();
    st.push_back(e);
  }
  j["states"] = st;
  j["logits"] = r.logits_finite ? nlohmann::json{{"rel_err", num(r.logits_rel_err)},
                                                 {"kl", num(r.kl)},
                                                 {"top1_agreement", num(r.top1_agreement)}}
                                : nlohmann::json{{"rel_err", nullptr}, {"kl", nullptr},
                                                 {"top1_agreement", nullptr}};
  j["nll"] = {{"a", num(r.nll_a)}, {"b", num(r.nll_b)}};
  if (r.gen_a)
    j["generate"] = {{"a", r.gen_a->ids},
                     {"b", r.gen_b->ids},
                     {"text_a", r.gen_a->text ? nlohmann::json(*r.gen_a->text) : nlohmann::json()},
                     {"text_b", r.gen_b->text ? nlohmann::json(*r.gen_b->text) : nlohmann::json()},
                     {"agree", r.agree}};
  else
    j["generate"] = nullptr;
  j["finite"] = {{"a", r.finite_a}, {"b", r.finite_b}};
  return j;
}

std::string compare_text(const CompareResult& r) {
  std::string o = fmt::format("A: {}\nB: {}\n{} tokens\n  state    rel_err     cosine   max|a-b|\n",
                              r.label_a, r.label_b, r.tokens);
  for (const StateDiff& d : r.states)
    o += d.finite ? fmt::format("  {:5d}  {:9.3e}  {:9.6f}  {:9.3e}\n", d.index, d.rel_err,
                                d.cosine, d.max_abs_diff)
                  : fmt::format("  {:5d}  not finite in {}\n", d.index,
                                "A or B (run `nanscope trace` on it)");
  if (r.logits_finite)
    o += fmt::format("Logits: rel_err {:.3e}, KL(B||A) {:.3e} nats, top-1 agreement {:.1f}%\n",
                     r.logits_rel_err, r.kl, 100 * r.top1_agreement);
  else
    o += "Logits: not finite in A or B\n";
  o += fmt::format("Next-token NLL of the input: A {:.4f}, B {:.4f} nats\n", r.nll_a, r.nll_b);
  if (r.gen_a) {
    o += fmt::format("Greedy continuations agree on the first {} of {} / {} tokens\n", r.agree,
                     r.gen_a->ids.size(), r.gen_b->ids.size());
    o += "  A: " + (r.gen_a->text ? *r.gen_a->text : fmt::format("{}", fmt::join(r.gen_a->ids, ","))) + "\n";
    o += "  B: " + (r.gen_b->text ? *r.gen_b->text : fmt::format("{}", fmt::join(r.gen_b->ids, ","))) + "\n";
  }
  return o;
}

}  // namespace nanscope
