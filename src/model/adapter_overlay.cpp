// The adapter applied unmerged (adapter_overlay.hpp): its tensors read once into fp32, the LoRA
// branches computed beside each base output as PeftModel computes them.
#pragma GCC optimize("fp-contract=off")

#include "model/adapter_overlay.hpp"

#include <fmt/format.h>

#include <cmath>

#include "common/error.hpp"
#include "numerics/parallel.hpp"

namespace nanscope {

namespace {

std::vector<float> to_f32(const SafetensorsFile& f, const TensorInfo* t) {
  if (!t) return {};
  std::vector<float> v(t->numel());
  load_to_f32(f.data(*t).data(), t->dtype, v.data(), v.size());
  return v;
}

}  // namespace

std::shared_ptr<const AdapterOverlay> AdapterOverlay::open(const std::filesystem::path& dir,
                                                           const Checkpoint& base) {
  Adapter ad = Adapter::open(dir);
  const bool base_tied =
      base.config().tie_word_embeddings && !base.find(kLmHeadWeight) && base.find(kEmbedWeight);
  AdapterPlan plan = plan_adapter(ad, base, base_tied);
  std::shared_ptr<AdapterOverlay> ov(new AdapterOverlay(std::move(ad), std::move(plan)));
  const AdapterConfig& cfg = ov->ad_.config();
  const SafetensorsFile& f = ov->ad_.file();
  const std::string file = (ov->ad_.dir() / "adapter_model.safetensors").string();
  if (cfg.fan_in_fan_out)
    fail("{}: fan_in_fan_out is set (GPT-2's Conv1D layers); no supported family has them",
         (ov->ad_.dir() / "adapter_config.json").string());
  for (const auto& [module, m] : ov->plan_.lora) {
    // peft builds LoRA layers only on the modules the config targets; others are left out.
    if (!is_targeted(cfg, module)) continue;
    if (module.find(".experts.") != std::string::npos)
      fail(
          "{}: module {} is a mixture-of-experts expert; the unmerged forward pass applies "
          "LoRA to attention, dense MLPs, embeddings and lm_head only (merge it with `nanscope "
          "merge` and run the merged model)",
          file, module);
    if (m.magnitude && m.bias)
      fail("{}: module {} has both a DoRA magnitude and a LoRA bias; peft has no such layer", file,
           module);
    LoraBranch b;
    b.module = module;
    b.embedding = m.embedding;
    b.r = m.A->shape[0];
    b.in = m.A->shape[1];
    b.out = m.B->shape[0];
    b.scale = float(m.scale.scale);
    b.A = to_f32(f, m.A);
    b.B = to_f32(f, m.B);
    b.bias = to_f32(f, m.bias);
    b.magnitude = to_f32(f, m.magnitude);
    ov->lora_.emplace(module, std::move(b));
  }
  if (base_tied && !ov->plan_.token_rows.empty())
    fail(
        "{}: trainable tokens on a model with tied embeddings are not applied unmerged by "
        "nanscope (peft ties the output rows too); merge the adapter and run the merged model",
        file);
  return ov;
}

const LoraBranch* AdapterOverlay::lora(const std::string& module) const {
  const auto it = lora_.find(module);
  return it == lora_.end() ? nullptr : &it->second;
}

std::optional<TensorRef> AdapterOverlay::replacement(const std::string& name) const {
  const auto it = plan_.replace.find(name);
  if (it == plan_.replace.end()) return std::nullopt;
  return TensorRef{&ad_.file(), it->second};
}

const TokenRows* AdapterOverlay::token_rows(const std::string& name) const {
  const auto it = plan_.token_rows.find(name);
  return it == plan_.token_rows.end() ? nullptr : &it->second;
}

std::optional<TensorRef> AdapterOverlay::token_values(const std::string& name) const {
  const TokenRows* r = token_rows(name);
  if (!r) return std::nullopt;
  return TensorRef{&ad_.file(), r->values};
}

std::span<const float> AdapterOverlay::dora_scale(const LoraBranch& b, const WeightView& w,
                                                  DType dt) const {
  const std::lock_guard<std::mutex> lock(mu_);
  auto [it, fresh] = dora_.try_emplace({b.module, dt});
  std::vector<float>& m = it->second;
  if (!fresh) return m;
  const int64_t r = b.r;
  if (!b.embedding) {
    // ||W[j, :] + scale * (B @ A)[j, :]|| (peft: lora_B(lora_A(eye)).T, fp32, W as run dtype).
    m.resize(size_t(b.out));
    parallel_for(b.out, 4, [&](int64_t j0, int64_t j1) {
      std::vector<float> wrow(size_t(b.in));
      for (int64_t j = j0; j < j1; ++j) {
        weight_rows(w, j, 1, dt, wrow.data());
        double ss = 0.0;
        for (int64_t i = 0; i < b.in; ++i) {
          float lw = 0.0f;
          for (int64_t k = 0; k < r; ++k) lw += b.B[size_t(j * r + k)] * b.A[size_t(k * b.in + i)];
          const float v = wrow[size_t(i)] + b.scale * lw;
          ss += double(v) * double(v);
        }
        m[size_t(j)] = b.magnitude[size_t(j)] / float(std::sqrt(ss));
      }
    });
  } else {
    // Embedding (fan_in_fan_out): norms over the vocabulary of W^T + scale * (A^T @ B^T)^T.
    const int64_t V = b.in, H = b.out;
    std::vector<double> ss(static_cast<size_t>(H), 0.0);
    std::vector<float> wrow(static_cast<size_t>(H));
    for (int64_t v = 0; v < V; ++v) {
      weight_rows(w, v, 1, dt, wrow.data());
      for (int64_t h = 0; h < H; ++h) {
        float lw = 0.0f;
        for (int64_t k = 0; k < r; ++k) lw += b.A[size_t(k * V + v)] * b.B[size_t(h * r + k)];
        const float x = wrow[size_t(h)] + b.scale * lw;
        ss[size_t(h)] += double(x) * double(x);
      }
    }
    m.resize(size_t(H));
    for (int64_t h = 0; h < H; ++h)
      m[size_t(h)] = b.magnitude[size_t(h)] / float(std::sqrt(ss[size_t(h)]));
  }
  return m;
}

void apply_lora_linear(const AdapterOverlay& ov, const LoraBranch& b, const WeightView& w_full,
                       const float* x, int64_t T, int64_t row0, int64_t rows, const float* bias,
                       DType dt, float* y) {
  const int64_t r = b.r;
  std::span<const float> m;
  if (!b.magnitude.empty()) m = ov.dora_scale(b, w_full, dt);
  parallel_for(T, 4, [&](int64_t t0, int64_t t1) {
    const int64_t n = t1 - t0;
    std::vector<float> a(size_t(n * r)), u(size_t(n * rows));
    sgemm_nt(x + t0 * b.in, b.in, b.A.data(), b.in, a.data(), r, n, r, b.in);  // lora_A(x)
    sgemm_nt(a.data(), r, b.B.data() + row0 * r, r, u.data(), rows, n, rows, r);  // lora_B(.)
    for (int64_t t = 0; t < n; ++t) {
      float* yt = y + (t0 + t) * rows;
      const float* ut = u.data() + t * rows;
      for (int64_t j = 0; j < rows; ++j) {
        float lo = ut[j];
        if (!b.bias.empty()) lo += b.bias[size_t(row0 + j)];
        if (m.empty()) {
          yt[j] = round_to(yt[j] + lo * b.scale, dt);
        } else {  // DoRA: (m - 1) * (base - bias) + m * lora * scale, added to the base
          const float mj = m[size_t(row0 + j)];
          const float base = bias ? round_to(yt[j] - bias[j], dt) : yt[j];
          const float e = (mj - 1.0f) * base + mj * lo * b.scale;
          yt[j] = round_to(yt[j] + e, dt);
        }
      }
    }
  });
}

void apply_lora_embedding(const AdapterOverlay& ov, const LoraBranch& b, const WeightView& w,
                          std::span<const int64_t> ids, DType dt, float* h) {
  const int64_t r = b.r, V = b.in, H = b.out;
  std::span<const float> m;
  if (!b.magnitude.empty()) m = ov.dora_scale(b, w, dt);
  std::vector<float> a(static_cast<size_t>(r));
  for (size_t t = 0; t < ids.size(); ++t) {
    for (int64_t k = 0; k < r; ++k) a[size_t(k)] = b.A[size_t(k * V + ids[t])];
    float* ht = h + int64_t(t) * H;
    for (int64_t j = 0; j < H; ++j) {
      float lo = 0.0f;
      for (int64_t k = 0; k < r; ++k) lo += a[size_t(k)] * b.B[size_t(j * r + k)];
      if (m.empty())
        ht[j] = round_to(ht[j] + lo * b.scale, dt);
      else  // DoRA: m * base + m * lora * scale
        ht[j] = round_to(m[size_t(j)] * ht[j] + m[size_t(j)] * lo * b.scale, dt);
    }
  }
}

}  // namespace nanscope
