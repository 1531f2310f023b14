// Each float32 operation of transformers' rope code is one float operation here, in the same
// order; Python scalars enter torch ops cast to float32, and `scalar / tensor` is
// `tensor.reciprocal() * scalar` (torch's __rtruediv__). No contraction into FMA.
#pragma GCC optimize("fp-contract=off")

#include "model/rope.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <stdexcept>
#include <vector>

#include "common/error.hpp"

namespace nanscope {

namespace {

// torch.pow on float32 (Sleef u10 / libm): the correctly rounded result in practice.
inline float powf_t(float b, float e) {
  return float(std::pow(double(b), double(e)));
}
inline float recip(float x) {
  return 1.0f / x;
}

// base ** (arange(0, dim, 2).float() / dim), float32 throughout.
std::vector<float> pos_freqs(float base, int64_t dim) {
  std::vector<float> p(size_t(dim / 2));
  for (int64_t j = 0; j < dim / 2; ++j) p[size_t(j)] = powf_t(base, float(2 * j) / float(dim));
  return p;
}

std::vector<float> default_inv_freq(double theta, int64_t dim) {
  std::vector<float> inv = pos_freqs(float(theta), dim);
  for (float& v : inv) v = recip(v);
  return inv;
}

double get_mscale(double scale, double mscale = 1.0) {
  if (scale <= 1) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

}  // namespace

RopeParameters rope_parameters(const ModelConfig& c, int64_t seq_len) {
  const double partial = c.rope.partial_rotary_factor.value_or(1.0);
  return rope_parameters(c, c.rope, int64_t(double(c.head_dim) * partial), seq_len);
}

RopeParameters rope_parameters(const ModelConfig& c, const RopeConfig& r, int64_t dim,
                               int64_t seq_len) {
  RopeParameters out;

  if (r.type == "default") {
    out.inv_freq = default_inv_freq(r.theta, dim);
  } else if (r.type == "linear") {
    out.inv_freq = default_inv_freq(r.theta, dim);
    for (float& v : out.inv_freq) v = v / float(r.factor);
  } else if (r.type == "dynamic") {
    // At init (and while seq_len <= max_position_embeddings) the base is unchanged. Above it,
    // dynamic_rope_update passes seq_len as an int64 tensor: the base is then a float32 tensor.
    const int64_t maxpos = c.max_position_embeddings;
    if (seq_len <= maxpos) {
      out.inv_freq = default_inv_freq(r.theta, dim);
    } else {
      float a = float(r.factor) * float(seq_len);
      a = a / float(maxpos);
      a = a - float(r.factor - 1.0);
      const float p = powf_t(a, float(double(dim) / double(dim - 2)));
      const float base = float(r.theta) * p;
      out.inv_freq = pos_freqs(base, dim);
      for (float& v : out.inv_freq) v = recip(v);
    }
  } else if (r.type == "llama3") {
    if (!r.original_max_position)
      fail("rope: llama3 needs `original_max_position_embeddings` in the rope parameters");
    std::vector<float> inv = default_inv_freq(r.theta, dim);
    const double old_ctx = *r.original_max_position;
    const float low_wavelen = float(old_ctx / r.low_freq_factor);
    const float high_wavelen = float(old_ctx / r.high_freq_factor);
    const float two_pi = float(2 * std::numbers::pi);
    for (float& f : inv) {
      const float wavelen = recip(f) * two_pi;
      float llama = wavelen > low_wavelen ? f / float(r.factor) : f;
      float smooth = recip(wavelen) * float(old_ctx);
      smooth = smooth - float(r.low_freq_factor);
      smooth = smooth / float(r.high_freq_factor - r.low_freq_factor);
      float a = 1.0f - smooth;
      a = a * llama;
      a = a / float(r.factor);
      const float b = smooth * llama;
      const float smoothed = a + b;
      const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
      if (medium) llama = smoothed;
      f = llama;
    }
    out.inv_freq = std::move(inv);
  } else if (r.type == "yarn") {
    const double orig = r.original_max_position.value_or(double(c.max_position_embeddings));
    const double factor = r.factor;
    double attention_factor;
    if (r.attention_factor) {
      attention_factor = *r.attention_factor;
    } else if (r.mscale.value_or(0) != 0 && r.mscale_all_dim.value_or(0) != 0) {
      attention_factor = get_mscale(factor, *r.mscale) / get_mscale(factor, *r.mscale_all_dim);
    } else {
      attention_factor = get_mscale(factor);
    }
    const double beta_fast = r.beta_fast != 0 ? r.beta_fast : 32.0;
    const double beta_slow = r.beta_slow != 0 ? r.beta_slow : 1.0;
    const double base = r.theta;
    auto correction_dim = [&](double rotations) {
      return (double(dim) * std::log(orig / (rotations * 2 * std::numbers::pi))) /
             (2 * std::log(base));
    };
    double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
    if (r.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, double(dim - 1));
    if (low == high) high += 0.001;
    const std::vector<float> pos = pos_freqs(float(base), dim);
    out.inv_freq.resize(pos.size());
    for (size_t j = 0; j < pos.size(); ++j) {
      const float extrapolation = recip(pos[j]);
      const float interpolation = recip(float(factor) * pos[j]);
      float ramp = (float(j) - float(low)) / float(high - low);
      ramp = std::clamp(ramp, 0.0f, 1.0f);
      const float ext_factor = 1.0f - ramp;
      const float a = interpolation * (1.0f - ext_factor);
      const float b = extrapolation * ext_factor;
      out.inv_freq[j] = a + b;
    }
    out.attention_scaling = attention_factor;
  } else if (r.type == "longrope") {
    // Phi-3: per-frequency factors, the long ones once the input passes the original context
    // (longrope_frequency_update); the cos/sin scaling from the context ratio.
    const std::optional<double> orig_opt =
        r.original_max_position ? r.original_max_position
        : c.original_max_position_embeddings
            ? std::optional<double>(double(*c.original_max_position_embeddings))
            : std::nullopt;
    if (!orig_opt) fail("rope: longrope needs `original_max_position_embeddings`");
    const double orig = *orig_opt;
    const std::vector<double>& ext = double(seq_len) > orig ? r.long_factor : r.short_factor;
    if (int64_t(ext.size()) != dim / 2)
      fail("rope: longrope {} has {} values, expected {} (rotary dimensions / 2)",
           double(seq_len) > orig ? "long_factor" : "short_factor", ext.size(), dim / 2);
    const double factor = r.has_factor ? r.factor : double(c.max_position_embeddings) / orig;
    double attention_factor = 1.0;
    if (r.attention_factor)
      attention_factor = *r.attention_factor;
    else if (factor > 1.0)
      attention_factor = std::sqrt(1 + std::log(factor) / std::log(orig));
    const std::vector<float> pos = pos_freqs(float(r.theta), dim);
    out.inv_freq.resize(pos.size());
    for (size_t j = 0; j < pos.size(); ++j) out.inv_freq[j] = recip(float(ext[j]) * pos[j]);
    out.attention_scaling = attention_factor;
  } else {
    fail(
        "rope type \"{}\" is not supported (supported: default, linear, dynamic, yarn, llama3, "
        "longrope)",
        r.type);
  }
  return out;
}

RopeTables rope_tables(const ModelConfig& c, int64_t T, DType dt) {
  const double partial = c.rope.partial_rotary_factor.value_or(1.0);
  return rope_tables(c, c.rope, int64_t(double(c.head_dim) * partial), T, dt);
}

RopeTables rope_tables(const ModelConfig& c, const RopeConfig& r, int64_t dim, int64_t T, DType dt,
                       int64_t first) {
  const RopeParameters p = rope_parameters(c, r, dim, T);
  RopeTables tab;
  tab.T = T;
  tab.D = dim;
  tab.first = std::clamp<int64_t>(first, 0, T);
  const int64_t D = tab.D, half = D / 2, rows = T - tab.first;
  tab.cos.resize(size_t(rows * D));
  tab.sin.resize(size_t(rows * D));
  const float scale = float(p.attention_scaling);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < half; ++j) {
      // freqs = inv_freq @ position_ids (K = 1: one float product); emb = cat(freqs, freqs).
      const float f = p.inv_freq[size_t(j)] * float(tab.first + i);
      const float cv = round_to(float(std::cos(double(f))) * scale, dt);
      const float sv = round_to(float(std::sin(double(f))) * scale, dt);
      tab.cos[size_t(i * D + j)] = tab.cos[size_t(i * D + j + half)] = cv;
      tab.sin[size_t(i * D + j)] = tab.sin[size_t(i * D + j + half)] = sv;
    }
  return tab;
}

bool rope_depends_on_length(const RopeConfig& r) {
  return r.type == "dynamic" || r.type == "longrope";
}

void apply_rope(float* x, int64_t T, int64_t heads, const RopeTables& tab, DType dt, int64_t pos0,
                int64_t head_dim) {
  const int64_t D = tab.D, half = D / 2;
  const int64_t stride = head_dim > 0 ? head_dim : D;  // the dimensions past D pass through
  if (pos0 < tab.first || pos0 + T > tab.T)
    throw std::logic_error("apply_rope: positions beyond the cos/sin tables");
  // Each step over whole rows so that the products and sums vectorise and the roundings go
  // through the vectorised round_inplace (same values as round_to, element by element).
  std::vector<float> a(static_cast<size_t>(D)), b(a.size());
  for (int64_t t = 0; t < T; ++t) {
    const float* cs = tab.cos.data() + (pos0 - tab.first + t) * D;
    const float* sn = tab.sin.data() + (pos0 - tab.first + t) * D;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * stride;
      for (int64_t j = 0; j < half; ++j) b[size_t(j)] = -v[j + half] * sn[j];
      for (int64_t j = half; j < D; ++j) b[size_t(j)] = v[j - half] * sn[j];
      for (int64_t j = 0; j < D; ++j) a[size_t(j)] = v[j] * cs[j];
      round_inplace(a.data(), a.size(), dt);
      round_inplace(b.data(), b.size(), dt);
      for (int64_t j = 0; j < D; ++j) v[j] = a[size_t(j)] + b[size_t(j)];
      round_inplace(v, size_t(D), dt);
    }
  }
}

}  // namespace nanscope
