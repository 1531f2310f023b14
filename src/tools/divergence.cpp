// The divergence evidence (divergence.hpp).
#include "tools/divergence.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "tools/compare.hpp"

namespace nanscope {

namespace {

// Squared Frobenius norm of a stored tensor (and, with `minus`, of its difference from another
// of the same shape), read in chunks converted to fp32.
double sq_norm(const TensorRef& t, const TensorRef* minus = nullptr) {
  const size_t n = t.info->numel(), chunk = 1 << 16;
  const size_t esz = size_t(dtype_bits(t.info->dtype) / 8);
  const size_t esz2 = minus ? size_t(dtype_bits(minus->info->dtype) / 8) : 0;
  std::vector<float> a(chunk), b(chunk);
  double s = 0;
  for (size_t i = 0; i < n; i += chunk) {
    const size_t m = std::min(chunk, n - i);
    load_to_f32(t.bytes().data() + i * esz, t.info->dtype, a.data(), m);
    if (minus) load_to_f32(minus->bytes().data() + i * esz2, minus->info->dtype, b.data(), m);
    for (size_t k = 0; k < m; ++k) {
      const double d = minus ? double(a[k]) - double(b[k]) : double(a[k]);
      s += d * d;
    }
  }
  t.release();
  if (minus) minus->release();
  return s;
}

std::string g(double v) { return fmt::format("{:.3g}", v); }

}  // namespace

std::vector<UpdateNorm> adapter_update_norms(const AdapterOverlay& ov, const Checkpoint& base) {
  std::vector<UpdateNorm> out;
  for (const auto& [module, m] : ov.plan().lora) {
    const LoraBranch* b = ov.lora(module);
    if (!b) continue;
    const std::string w = module + ".weight";
    const auto ref = base.find(w == "lm_head.weight" && !base.find(w) ? "model.embed_tokens.weight" : w);
    if (!ref) continue;
    // ||B A||^2 = sum_ij (B^T B)_ij (A A^T)_ij: r x r Gram matrices instead of the product.
    const int64_t r = b->r, rows_b = b->out, cols_a = b->in;
    std::vector<double> gb(size_t(r * r), 0.0), ga(size_t(r * r), 0.0);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) {
        double sb = 0, sa = 0;
        for (int64_t o = 0; o < rows_b; ++o) sb += double(b->B[size_t(o * r + i)]) * b->B[size_t(o * r + j)];
        for (int64_t c = 0; c < cols_a; ++c) sa += double(b->A[size_t(i * cols_a + c)]) * b->A[size_t(j * cols_a + c)];
        gb[size_t(i * r + j)] = sb;
        ga[size_t(i * r + j)] = sa;
      }
    double d2 = 0;
    for (size_t k = 0; k < gb.size(); ++k) d2 += gb[k] * ga[k];
    const double wn = std::sqrt(sq_norm(*ref));
    const double dn = std::fabs(double(b->scale)) * std::sqrt(std::max(d2, 0.0));
    out.push_back({w, wn > 0 ? dn / wn : std::numeric_limits<double>::infinity()});
  }
  return out;
}

std::vector<UpdateNorm> weight_update_norms(const Checkpoint& tuned, const Checkpoint& base) {
  std::vector<UpdateNorm> out;
  for (const auto& [name, ref] : tuned.tensors()) {
    const std::optional<TensorRef> a = ref;
    const auto b = base.find(name);
    if (!a || !b || a->info->shape != b->info->shape || a->info->shape.size() != 2 ||
        !is_float_computable(a->info->dtype) || !is_float_computable(b->info->dtype))
      continue;
    const double d2 = sq_norm(*a, &*b);
    if (d2 == 0) continue;
    const double wn = std::sqrt(sq_norm(*b));
    out.push_back({name, wn > 0 ? std::sqrt(d2) / wn : std::numeric_limits<double>::infinity()});
  }
  return out;
}

namespace {
class StateMax : public Observer {
 public:
  void hidden_state(int64_t, std::span<const float> v, int64_t, int64_t) override {
    double m = 0;
    bool ok = true;
    for (float x : v) {
      if (!std::isfinite(x)) ok = false;
      else m = std::max(m, double(std::fabs(x)));
    }
    abs_max.push_back(ok ? m : std::numeric_limits<double>::quiet_NaN());
    finite = finite && ok;
    states.emplace_back(v.begin(), v.end());
  }
  bool wants_sites() const override { return false; }
  std::vector<double> abs_max;
  std::vector<std::vector<float>> states;
  bool finite = true;
};
}  // namespace

RunFigures fp32_figures(const Checkpoint& ck, const AdapterOverlay* adapter,
                        std::span<const int64_t> ids) {
  ForwardOptions fo;
  fo.dtype = DType::F32;
  fo.attention = AttentionProfile::Eager;
  fo.adapter = adapter;
  StateMax obs;
  const ForwardResult r = forward(ck, ids, fo, &obs);
  RunFigures f;
  f.state_abs_max = obs.abs_max;
  f.states = std::move(obs.states);
  f.finite = obs.finite;
  for (size_t i = 0; i + 1 < obs.abs_max.size(); ++i)
    f.max_abs = std::isnan(obs.abs_max[i]) ? std::numeric_limits<double>::infinity()
                                           : std::max(f.max_abs, obs.abs_max[i]);
  f.nll = next_token_nll(r.logits, ids, r.vocab);
  return f;
}

Divergence judge_divergence(const std::vector<UpdateNorm>& updates, RunFigures tuned,
                            RunFigures base) {
  Divergence d;
  for (const UpdateNorm& u : updates)
    if (u.rel > d.worst.rel || d.worst.tensor.empty()) d.worst = u;
  d.growth = base.max_abs > 0 ? tuned.max_abs / base.max_abs : 0;
  d.tuned = std::move(tuned);
  d.base = std::move(base);
  // Either signal alone is far outside what healthy fine-tunes show (divergence.hpp).
  d.diverged = d.growth >= kDivergedGrowth || d.worst.rel >= kDivergedUpdate;
  d.detail = fmt::format(
      "the fine-tune's update is {}x the norm of the base weights at {} (healthy fine-tunes stay "
      "below ~1.5; limit {}), its largest hidden state in fp32 is {} against the base model's {} "
      "on the same input ({}x; healthy: ~1-2x, limit {}), and the input's next-token NLL is {} "
      "nats against the base's {}",
      g(d.worst.rel), d.worst.tensor.empty() ? "?" : d.worst.tensor, g(kDivergedUpdate),
      g(d.tuned.max_abs), g(d.base.max_abs), g(d.growth), g(kDivergedGrowth), g(d.tuned.nll),
      g(d.base.nll));
  return d;
}

}  // namespace nanscope
