// The reference forward pass (model/reference.hpp): forward.cpp's computation for one sequence,
// one thread, from the scalar `_ref` kernels and plain loops.
//
// Shapes: T tokens, H hidden size, nH query heads, nKV key/value heads, D head dim, I MLP width,
// E experts, K experts per token, V vocabulary. Activations are row-major fp32 arrays holding
// values of the run dtype dt; round(x) = x stored in dt and read back (docs/forward.md).
#pragma GCC optimize("fp-contract=off")

#include "model/reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "model/arch.hpp"
#include "model/rope.hpp"
#include "model/weights.hpp"
#include "numerics/elementwise.hpp"
#include "numerics/kernels.hpp"
#include "numerics/stats.hpp"

namespace nanscope {
namespace {

using Vec = std::vector<float>;
using Shape = std::vector<int64_t>;

struct StopForward {};  // the observer's done() ended the pass

const float* ptr(const Activations& v) {
  return v.empty() ? nullptr : v.data();
}

// sum_d a[d] * b[d], fp32 accumulation in order.
float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

double peak_abs(const Vec& v) {
  double m = 0;
  for (float x : v)
    if (std::isfinite(x)) m = std::max(m, double(std::fabs(x)));
  return m;
}

// Attention's intermediates for the observer: scores and probs [nH, T, T], context [T, nH*D].
struct AttentionOut {
  Vec scores, probs, context;
  double peak = 0;  // largest finite |score| before rounding, visible keys only
};

class Pass {
 public:
  Pass(const Checkpoint& ck, const ForwardOptions& opt, Observer* obs, int64_t T)
      : c_(ck.config()),
        spec_(model_spec(c_)),
        dt_(opt.dtype),
        att_(opt.attention),
        obs_(obs),
        sites_(obs != nullptr && obs->wants_sites()),
        w_(ck, opt.dtype, opt.release_pages),
        T_(T),
        H_(spec_.hidden) {}

  // ids [T] -> h [T, H]
  Vec embed(std::span<const int64_t> ids) {
    const WeightView emb = w_.matrix(spec_.embed, spec_.vocab, H_);  // [V, H]
    Vec h(size_t(T_ * H_));
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t id = ids[size_t(t)];
      if (id < 0 || id >= spec_.vocab)
        fail("forward: token id {} (position {}) is out of range: vocab_size is {}", id, t,
             spec_.vocab);
      weight_rows(emb, id, 1, dt_, &h[size_t(t * H_)]);  // row `id`, as dt reads it
    }
    scale_embeddings(spec_, h.data(), h.size(), dt_);  // Gemma: h = round(h * round(sqrt(H)))
    site(-1, spec_.embed, h, {T_, H_});
    w_.release_all();
    return h;
  }

  uint64_t weight_bytes() const { return w_.bytes_read(); }

  // h [T, H] -> logits [T, V]
  Vec run(Vec h) {
    const int64_t N = int64_t(spec_.layers.size());
    hidden(0, h);
    for (int64_t l = 0; l < N; ++l) {
      layer(spec_.layers[size_t(l)], h);
      if (l + 1 < N) hidden(l + 1, h);
    }
    const Vec x = norm(-1, spec_.final_norm, h, w_.vector(spec_.final_norm, "weight", H_));
    hidden(N, x);
    const WeightView lm = w_.matrix(spec_.tied ? spec_.embed : spec_.lm_head, spec_.vocab, H_);
    Vec logits = linear(-1, spec_.lm_head, x, lm, nullptr);  // [T, V]
    if (spec_.final_softcap) {  // Gemma 2: logits = cap * tanh(logits / cap)
      softcap_inplace_ref(logits.data(), int64_t(logits.size()), *spec_.final_softcap, dt_);
      site(-1, "final_logit_softcapping", logits, {T_, spec_.vocab});
    }
    w_.release_all();
    return logits;
  }

 private:
  // ---- one decoder layer: the recipe ----
  void layer(const LayerSpec& s, Vec& h) {
    const int64_t l = s.index;
    const LayerNames& n = s.names;
    const LayerWeights w = w_.layer(s, H_);

    Vec x = norm(l, n.input_norm, h, w.input_norm);                                  // [T, H]
    Vec a = attention(s, w, x);                                                      // [T, H]
    if (!n.attn_out_norm.empty()) a = norm(l, n.attn_out_norm, a, w.attn_out_norm);  // Gemma
    h = residual(l, n.prefix + "residual_attn", h, a);                               // [T, H]

    x = norm(l, n.mlp_in_norm, h, w.mlp_in_norm);                                 // [T, H]
    Vec m = s.mlp.moe ? moe(s, w, x) : mlp(s, w, x);                              // [T, H]
    if (!n.mlp_out_norm.empty()) m = norm(l, n.mlp_out_norm, m, w.mlp_out_norm);  // Gemma
    h = residual(l, n.prefix + "residual_mlp", h, m);                             // [T, H]

    w_.release_all();
  }

  // x [T, H] -> o_proj(attention(q, k, v)) [T, H]
  Vec attention(const LayerSpec& s, const LayerWeights& w, const Vec& x) {
    const AttentionSpec& a = s.attn;
    const int64_t l = s.index, D = a.head_dim, nH = a.heads, nKV = a.kv_heads;
    const std::string& p = s.names.prefix;
    Vec q = linear(l, p + "self_attn.q_proj", x, w.q, ptr(w.q_bias));  // [T, nH*D]
    Vec k = linear(l, p + "self_attn.k_proj", x, w.k, ptr(w.k_bias));  // [T, nKV*D]
    Vec v = linear(l, p + "self_attn.v_proj", x, w.v, ptr(w.v_bias));  // [T, nKV*D]
    if (a.qk_norm) {  // Qwen3: RMSNorm over each head's D values, before RoPE
      q = norm(l, s.names.q_norm, q, w.q_norm, D, {T_, nH, D});   // [T, nH, D]
      k = norm(l, s.names.k_norm, k, w.k_norm, D, {T_, nKV, D});  // [T, nKV, D]
    }
    // RoPE on the first rotary_dim dimensions of each head (all but with partial rotary).
    const RopeTables tab = rope_tables(c_, spec_.ropes[size_t(a.rope)], a.rotary_dim, T_, dt_);
    apply_rope(q.data(), T_, nH, tab, dt_, 0, D);   // [T, nH, D]
    apply_rope(k.data(), T_, nKV, tab, dt_, 0, D);  // [T, nKV, D]
    if (sites_) {
      Vec qk;  // [T, nH + nKV, D]: q heads then k heads
      for (int64_t t = 0; t < T_; ++t) {
        qk.insert(qk.end(), q.begin() + t * nH * D, q.begin() + (t + 1) * nH * D);
        qk.insert(qk.end(), k.begin() + t * nKV * D, k.begin() + (t + 1) * nKV * D);
      }
      site(l, p + "self_attn.rope", qk, {T_, nH + nKV, D});
    }
    const AttentionOut r = att_ == AttentionProfile::Eager ? eager(a, q, k, v) : fused(a, q, k, v);
    emit(l, p + "self_attn.scores", r.scores, {nH, T_, T_}, scores_finite(a, r.scores), r.peak);
    site(l, p + "self_attn.probs", r.probs, {nH, T_, T_});
    site(l, p + "self_attn.context", r.context, {T_, nH * D});
    return linear(l, s.names.o_proj, r.context, w.o, ptr(w.o_bias));  // [T, H]
  }

  // transformers' eager_attention_forward, one (head, query row) at a time; head h reads kv
  // head h / (nH / nKV). Scores are computed for every key, masked ones too: a NaN or inf there
  // survives the mask and poisons the row, as in torch.
  AttentionOut eager(const AttentionSpec& a, const Vec& q, const Vec& k, const Vec& v) const {
    const int64_t T = T_, D = a.head_dim, nH = a.heads, nKV = a.kv_heads, rep = nH / nKV;
    const float mask = dtype_lowest(dt_);  // finfo(dt).min
    AttentionOut r{Vec(size_t(nH * T * T)), Vec(size_t(nH * T * T)), Vec(size_t(T * nH * D))};
    for (int64_t h = 0; h < nH; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const float* qi = &q[size_t((i * nH + h) * D)];  // [D]
        float* s = &r.scores[size_t((h * T + i) * T)];   // [T]
        float* pr = &r.probs[size_t((h * T + i) * T)];   // [T]
        for (int64_t j = 0; j < T; ++j) s[j] = dot(qi, &k[size_t((j * nKV + h / rep) * D)], D);
        // s = round(round(round(s) * scaling) (soft-capped: Gemma 2) + mask where j is hidden)
        if (a.window == 0 && !a.softcap)
          attention_scores_row_ref(s, T, i, a.scaling, mask, dt_, r.peak);
        else
          attention_scores_row_window(s, T, i, a.window, a.scaling, a.softcap.value_or(0.0f), mask,
                                      dt_, r.peak);
        softmax_row_ref(s, T, pr);  // fp32
        for (int64_t j = 0; j < T; ++j) pr[j] = round_to(pr[j], dt_);
        float* o = &r.context[size_t((i * nH + h) * D)];  // [D] = round(p @ v), fp32 sums
        for (int64_t d = 0; d < D; ++d) {
          float acc = 0.0f;
          for (int64_t j = 0; j < T; ++j) acc += pr[j] * v[size_t((j * nKV + h / rep) * D + d)];
          o[d] = round_to(acc, dt_);
        }
      }
    return r;
  }

  // SDPA as torch's CPU flash kernel computes it, in plain loops: s = (q.k) * scaling in fp32,
  // -inf where the key is hidden; m = max(s) with NaN left out; e = exp(s - m), sum in fp32; e
  // rounded to dt for e @ v; out = round((e @ v) * (1 / sum)). A row whose max is -inf (all
  // hidden, or all NaN: qwen3-example's NaN q heads) gets zeros. No soft-capping (sdpa has
  // none). The exp is the kernel's: in bf16/fp16 its fexp_u20 on the columns of whole 16-lane
  // vectors, whose error (1e-4 relative) is larger than the run dtype's rounding noise;
  // std::exp elsewhere (exp_u20, fp32's, is within 2e-7 of it). Unlike the fast path, the sum
  // is sequential, not 16 lane sums reduced as a tree (fp32 noise), and the exp of a NaN score
  // is NaN: torch's vector exp maps it to a number, so a row with some NaN scores may be
  // finite there (and in the fast path, which follows it) but is NaN here.
  AttentionOut fused(const AttentionSpec& a, const Vec& q, const Vec& k, const Vec& v) const {
    const int64_t T = T_, D = a.head_dim, nH = a.heads, nKV = a.kv_heads, rep = nH / nKV;
    const float ninf = -std::numeric_limits<float>::infinity();
    AttentionOut r{Vec(size_t(nH * T * T)), Vec(size_t(nH * T * T)), Vec(size_t(T * nH * D))};
    const int64_t vec_end = T / kTorchFloatLanes * kTorchFloatLanes;
    Vec e(static_cast<size_t>(T));
    for (int64_t h = 0; h < nH; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const float* qi = &q[size_t((i * nH + h) * D)];  // [D]
        float* s = &r.scores[size_t((h * T + i) * T)];   // [T]
        float* pr = &r.probs[size_t((h * T + i) * T)];   // [T]
        float m = ninf;
        bool vector_nan = false;
        for (int64_t j = 0; j < T; ++j) {
          s[j] = ninf;
          if (!masked_key(i, j, a.window)) {
            s[j] = dot(qi, &k[size_t((j * nKV + h / rep) * D)], D) * a.scaling;
            if (std::isfinite(s[j])) r.peak = std::max(r.peak, double(std::fabs(s[j])));
          }
          // torch's max: a NaN in the whole vectors of columns wins, one in the tail does not.
          if (std::isnan(s[j]))
            vector_nan = vector_nan || j < vec_end;
          else if (s[j] > m)
            m = s[j];
        }
        if (vector_nan) m = std::numeric_limits<float>::quiet_NaN();
        float sum = 0.0f;
        for (int64_t j = 0; j < T; ++j) {
          const float x = s[j] - m;  // torch: fexp_u20 on whole vectors in bf16/fp16
          e[size_t(j)] = m == ninf                          ? 0.0f
                         : j < vec_end && dt_ != DType::F32 ? torch_fexp_u20(x)
                                                            : std::exp(x);
          sum += e[size_t(j)];
        }
        const float inv = 1.0f / (sum == 0.0f ? 1.0f : sum);
        for (int64_t j = 0; j < T; ++j) {
          pr[j] = e[size_t(j)] * inv;                  // fp32, as the kernel keeps it
          e[size_t(j)] = round_to(e[size_t(j)], dt_);  // for e @ v
        }
        float* o = &r.context[size_t((i * nH + h) * D)];  // [D] = round((e @ v) * inv)
        for (int64_t d = 0; d < D; ++d) {
          float acc = 0.0f;
          for (int64_t j = 0; j < T; ++j)
            acc += e[size_t(j)] * v[size_t((j * nKV + h / rep) * D + d)];
          o[d] = round_to(acc * inv, dt_);
        }
      }
    return r;
  }

  // Masked scores may be -inf (fused, or fp16's min + a negative score) without harm.
  bool scores_finite(const AttentionSpec& a, const Vec& s) const {
    for (int64_t h = 0; h < a.heads; ++h)
      for (int64_t i = 0; i < T_; ++i)
        for (int64_t j = 0; j < T_; ++j) {
          const float x = s[size_t((h * T_ + i) * T_ + j)];
          const bool harmless =
              masked_key(i, j, a.window) && x == -std::numeric_limits<float>::infinity();
          if (!std::isfinite(x) && !harmless) return false;
        }
    return true;
  }

  // act = activation(gate_proj(x)) * up_proj(x); down_proj(act): x [rows, H] -> [rows, H].
  // Experts and the shared expert report no sites (report = false), as in forward.cpp.
  Vec mlp(const LayerSpec& s, const LayerWeights& w, const Vec& x, bool report = true) {
    const int64_t l = s.index;
    const LayerNames& n = s.names;
    const std::string p = n.prefix + "mlp.";
    const Vec g = linear(l, n.gate_proj.empty() ? p + "gate_proj" : n.gate_proj, x, w.gate,
                         ptr(w.gate_bias), report);  // [rows, I]
    const Vec u = linear(l, n.up_proj.empty() ? p + "up_proj" : n.up_proj, x, w.up, ptr(w.up_bias),
                         report);  // [rows, I]
    Vec act(g.size());             // [rows, I] = round(round(act(g)) * u)
    if (s.mlp.act == Activation::Silu)
      silu_mul_ref(g.data(), u.data(), int64_t(g.size()), dt_, act.data());
    else
      gelu_tanh_mul_ref(g.data(), u.data(), int64_t(g.size()), dt_, act.data());
    if (report) site(l, p + "act", act, {int64_t(act.size()) / w.gate.rows, w.gate.rows});
    return linear(l, n.down_proj.empty() ? p + "down_proj" : n.down_proj, act, w.down,
                  ptr(w.down_bias), report);  // [rows, H]
  }

  // Mixture of experts as transformers 5 computes it: router logits, softmax in fp32, top-k
  // (renormalised where the family does), weights rounded to dt (Qwen) or kept fp32 (Mixtral);
  // per token the weighted expert outputs summed in fp32 in rank order, rounded once.
  Vec moe(const LayerSpec& s, const LayerWeights& w, const Vec& x) {
    const MlpSpec& m = s.mlp;
    const LayerNames& n = s.names;
    const int64_t l = s.index, E = m.experts, K = m.top_k, I = m.intermediate;
    const Vec logits = linear(l, n.prefix + "mlp.gate", x, w.router, nullptr);  // [T, E]
    Vec out(size_t(T_ * H_));                                                   // [T, H]
    Vec p(static_cast<size_t>(E)), acc(static_cast<size_t>(H_));
    std::vector<int64_t> idx(static_cast<size_t>(E));
    for (int64_t t = 0; t < T_; ++t) {
      softmax_row_ref(&logits[size_t(t * E)], E, p.data());  // [E] fp32
      std::iota(idx.begin(), idx.end(), 0);  // torch.topk: largest first, ties by lower index
      std::stable_sort(idx.begin(), idx.end(),
                       [&](int64_t a, int64_t b) { return p[size_t(a)] > p[size_t(b)]; });
      float sum = 0.0f;  // of the top-k probabilities, rank order
      for (int64_t r = 0; r < K; ++r) sum += p[size_t(idx[size_t(r)])];
      const Vec xt(x.begin() + t * H_, x.begin() + (t + 1) * H_);  // [1, H]
      std::fill(acc.begin(), acc.end(), 0.0f);                     // [H] fp32
      for (int64_t r = 0; r < K; ++r) {
        const int64_t e = idx[size_t(r)];
        float wk = p[size_t(e)];
        if (m.norm_topk) wk = wk / sum;
        if (m.router_in_dtype) wk = round_to(wk, dt_);
        LayerWeights ew;
        ew.gate = w_.matrix(n.expert(e, n.expert_gate), I, H_);  // [I, H]
        ew.up = w_.matrix(n.expert(e, n.expert_up), I, H_);      // [I, H]
        ew.down = w_.matrix(n.expert(e, n.expert_down), H_, I);  // [H, I]
        const Vec y = mlp(s, ew, xt, false);                     // [1, H]
        for (int64_t j = 0; j < H_; ++j) {
          const float c = y[size_t(j)] * wk;  // rounded only when both factors are in dt
          acc[size_t(j)] += m.router_in_dtype ? round_to(c, dt_) : c;
        }
      }
      for (int64_t j = 0; j < H_; ++j) out[size_t(t * H_ + j)] = round_to(acc[size_t(j)], dt_);
    }
    if (m.shared_intermediate > 0) {  // Qwen2-MoE: out = round(out + sigmoid(gate(x)) * shared(x))
      LayerWeights sw;
      sw.gate = w.shared_gate, sw.up = w.shared_up, sw.down = w.shared_down;
      const Vec sh = mlp(s, sw, x, false);                                   // [T, H]
      const Vec g = linear(l, "", x, w.shared_expert_gate, nullptr, false);  // [T, 1]
      Vec scaled(sh.size());  // [T, H] = round(round(sigmoid(g)) * sh)
      sigmoid_scale_rows(g.data(), sh.data(), T_, H_, dt_, scaled.data());
      for (size_t i = 0; i < out.size(); ++i) out[i] = round_to(out[i] + scaled[i], dt_);
    }
    site(l, n.prefix + "mlp", out, {T_, H_});
    return out;
  }

  // ---- building blocks ----
  // y = round(x @ W^T + bias), fp32 sums: x [rows, W.cols] -> y [rows, W.rows]
  Vec linear(int64_t l, const std::string& name, const Vec& x, const WeightView& W,
             const float* bias, bool report = true) {
    const int64_t rows = int64_t(x.size()) / W.cols;
    // linear_ref in dt, faster: W converted once as dt reads it, then fp32 sums, one rounding.
    Vec wf(size_t(W.rows * W.cols));
    weight_rows(W, 0, W.rows, dt_, wf.data());
    const WeightView w32{reinterpret_cast<const std::byte*>(wf.data()), DType::F32, W.rows, W.cols};
    Vec y(size_t(rows * W.rows));
    linear_ref(x.data(), rows, w32, bias, DType::F32, y.data());
    for (float& v : y) v = round_to(v, dt_);
    if (report) site(l, name, y, {rows, W.rows});
    return y;
  }

  // RMSNorm over rows of n values (Gemma: times 1 + w): x [rows, n] -> [rows, n]
  Vec norm(int64_t l, const std::string& name, const Vec& x, const Activations& w, int64_t n = 0,
           Shape shape = {}) {
    if (n == 0) n = H_;
    Vec y(x.size());
    rmsnorm_ref(x.data(), int64_t(x.size()) / n, n, w.data(), spec_.eps, dt_, y.data(),
                spec_.norm == NormKind::RmsOffset);
    site(l, name, y, shape.empty() ? Shape{T_, n} : shape);
    return y;
  }

  // round(h + y): [T, H]
  Vec residual(int64_t l, const std::string& name, const Vec& h, const Vec& y) {
    Vec r(h.size());
    for (size_t i = 0; i < h.size(); ++i) r[i] = round_to(h[i] + y[i], dt_);
    site(l, name, r, {T_, H_});
    return r;
  }

  // ---- reporting ----
  void site(int64_t l, const std::string& name, const Vec& v, const Shape& shape) {
    if (sites_) emit(l, name, v, shape, all_finite(v), peak_abs(v));
  }

  void emit(int64_t l, const std::string& name, const Vec& v, const Shape& shape, bool finite,
            double peak) {
    if (!sites_) return;
    SiteView sv;
    sv.layer = l;
    sv.name = name;
    sv.values = v;
    sv.shape = shape;
    sv.finite = finite;
    sv.peak_abs = peak;
    obs_->site(sv);
    if (obs_->done()) throw StopForward{};
  }

  void hidden(int64_t index, const Vec& h) {
    if (!obs_) return;
    obs_->hidden_state(index, h, T_, H_);
    if (obs_->done()) throw StopForward{};
  }

  const ModelConfig& c_;
  const ModelSpec spec_;
  DType dt_;
  AttentionProfile att_;
  Observer* obs_;
  bool sites_;
  WeightSource w_;
  int64_t T_, H_;
};

}  // namespace

ForwardResult forward_reference(const Checkpoint& ck, std::span<const int64_t> ids,
                                const ForwardOptions& opt, Observer* obs) {
  if (ids.empty()) fail("forward: no input tokens");
  if (!is_float_computable(opt.dtype))
    fail("forward: run dtype {} is not one of F32, BF16, F16", dtype_name(opt.dtype));
  ForwardResult res;
  res.tokens = int64_t(ids.size());
  res.hidden = ck.config().hidden_size;
  res.vocab = ck.config().vocab_size;
  Pass pass(ck, opt, obs, res.tokens);
  try {
    const Vec logits = pass.run(pass.embed(ids));
    res.logits.assign(logits.begin(), logits.end());
  } catch (const StopForward&) {
    res.stopped_early = true;
  }
  res.weight_bytes = pass.weight_bytes();
  return res;
}

}  // namespace nanscope
