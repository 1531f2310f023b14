// The forward pass as a recipe: RMSNorm; Attention; Residual; RMSNorm; MLP; Residual. Every
// rounding point is the one of transformers' modeling_qwen3.py / modeling_llama.py /
// modeling_qwen2.py on CPU (docs/forward.md lists them with the code they mirror).
#pragma GCC optimize("fp-contract=off")

#include "model/forward.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <string>

#include "common/error.hpp"
#include "model/arch.hpp"
#include "model/rope.hpp"
#include "numerics/activations.hpp"
#include "numerics/gemm_amx.hpp"
#include "numerics/kernels.hpp"
#include "numerics/parallel.hpp"
#include "numerics/profile.hpp"

namespace nanscope {

std::string_view attention_name(AttentionProfile a) {
  return a == AttentionProfile::Eager ? "eager" : "fused";
}

std::optional<AttentionProfile> parse_attention(std::string_view s) {
  if (s == "eager") return AttentionProfile::Eager;
  if (s == "fused" || s == "sdpa") return AttentionProfile::Fused;
  return std::nullopt;
}

namespace {

using Vec = Activations;

struct StopForward {};

double finite_abs_max(std::span<const float> v) {
  double m = 0;
  for (float f : v)
    if (std::isfinite(f)) m = std::max(m, double(std::fabs(f)));
  return m;
}

bool all_finite(std::span<const float> v) {
  for (float f : v)
    if (!std::isfinite(f)) return false;
  return true;
}

// One sequence of a batch: rows [off, off + len) of every activation.
struct Segment {
  int64_t off = 0, len = 0;
};

class Model {
 public:
  // `lengths`: the sequences computed together (one for trace/check, many for hidden). Rows of
  // all sequences are stacked for the linear layers and norms; RoPE positions restart at 0 and
  // attention stays inside each sequence, so each one is computed as it would be alone.
  Model(const Checkpoint& ck, const ForwardOptions& opt, Observer* obs,
        std::span<const int64_t> lengths)
      : ck_(ck),
        c_(ck.config()),
        arch_(find_architecture(c_.model_type)),
        dt_(opt.dtype),
        att_(opt.attention),
        release_(opt.release_pages),
        obs_(obs),
        sites_(obs != nullptr && obs->wants_sites() && lengths.size() == 1) {
    for (int64_t len : lengths) {
      segs_.push_back({T_, len});
      T_ += len;
      maxT_ = std::max(maxT_, len);
    }
    if (!is_float_computable(dt_))
      fail("forward: run dtype {} is not one of F32, BF16, F16", dtype_name(dt_));
    if (c_.hidden_act != "silu")
      fail("{}: hidden_act \"{}\" is not supported (only silu)", ck.dir().string(), c_.hidden_act);
    H_ = c_.hidden_size, I_ = c_.intermediate_size, D_ = c_.head_dim;
    nH_ = c_.num_attention_heads, nKV_ = c_.num_key_value_heads;
    attn_bias_ = arch_.attention_bias_from_config && c_.attention_bias;
    qkv_bias_ = arch_.qkv_bias_always || attn_bias_;
    mlp_bias_ = arch_.mlp_bias_from_config && c_.mlp_bias;
    // cos/sin at a position do not depend on the sequence length, except for `dynamic` rope
    // above max_position_embeddings: one table per distinct length then.
    for (const Segment& g : segs_) {
      const int64_t len = c_.rope.type == "dynamic" ? g.len : maxT_;
      if (!rope_.contains(len)) rope_.emplace(len, rope_tables(c_, len, dt_));
    }
  }

  Vec embed(std::span<const int64_t> ids) {
    const TensorRef e = get("model.embed_tokens.weight", {c_.vocab_size, H_});
    const WeightView w = view(e);
    Vec h(size_t(T_ * H_));
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t id = ids[size_t(t)];
      if (id < 0 || id >= c_.vocab_size)
        fail("forward: token id {} (position {}) is out of range: vocab_size is {}", id, t,
             c_.vocab_size);
      weight_rows(w, id, 1, dt_, h.data() + t * H_);
    }
    site(-1, "model.embed_tokens", h, {T_, H_});
    release(e);
    return h;
  }

  // Decoder layers, final norm and lm_head, from the embeddings h [T, H].
  Vec run(Vec h) {
    hidden(0, h);
    const int64_t N = c_.num_hidden_layers;
    for (int64_t l = 0; l < N; ++l) {
      layer(l, h);
      if (l + 1 < N) hidden(l + 1, h);
    }
    const TensorRef nw = get("model.norm.weight", {H_});
    Vec x = rmsnorm_sites(-1, "model.norm", h, H_, param(nw, H_), T_);
    hidden(N, x);
    const bool tied = c_.tie_word_embeddings;
    const TensorRef lm =
        get(tied ? "model.embed_tokens.weight" : "lm_head.weight", {c_.vocab_size, H_});
    Vec logits = linear_site(-1, "lm_head", x, lm, Vec{});
    release(lm);
    release(nw);
    return logits;
  }

 private:
  // ---- one decoder layer ----
  void layer(int64_t l, Vec& h) {
    const LayerNames n = layer_names(l);
    std::vector<TensorRef> used;
    auto W = [&](const std::string& module, std::initializer_list<int64_t> shape) {
      used.push_back(get(module + ".weight", shape));
      return used.back();
    };
    auto B = [&](bool present, const std::string& module, int64_t size) -> Vec {
      if (!present) return {};
      used.push_back(get(module + ".bias", {size}));
      return param(used.back(), size);
    };

    // Attention block.
    Vec x = rmsnorm_sites(l, n.input_layernorm, h, H_, param(W(n.input_layernorm, {H_}), H_), T_);
    Vec attn = attention(l, n, x, W, B);
    Vec r(h.size());
    {
      const profile::Scope t("elementwise");
      add_round(h.data(), attn.data(), int64_t(h.size()), dt_, r.data());
    }
    site(l, n.prefix + "residual_attn", r, {T_, H_});
    h = std::move(r);

    // MLP block.
    x = rmsnorm_sites(l, n.post_attention_layernorm, h, H_,
                      param(W(n.post_attention_layernorm, {H_}), H_), T_);
    Vec act = mlp_act(l, n, x, W, B);
    Vec down =
        linear_site(l, n.down_proj, act, W(n.down_proj, {H_, I_}), B(mlp_bias_, n.down_proj, H_));
    r.resize(h.size());
    {
      const profile::Scope t("elementwise");
      add_round(h.data(), down.data(), int64_t(h.size()), dt_, r.data());
    }
    site(l, n.prefix + "residual_mlp", r, {T_, H_});
    h = std::move(r);

    for (const TensorRef& t : used) release(t);
  }

  // act = silu(gate_proj(x)) * up_proj(x). Without observed sites the products and silu_mul run
  // as one step (linear_silu_mul: on AMX, gate and up are combined in cache, never written).
  template <typename WFn, typename BFn>
  Vec mlp_act(int64_t l, const LayerNames& n, const Vec& x, WFn& W, BFn& B) {
    const TensorRef wg = W(n.gate_proj, {I_, H_}), wu = W(n.up_proj, {I_, H_});
    const Vec bg = B(mlp_bias_, n.gate_proj, I_), bu = B(mlp_bias_, n.up_proj, I_);
    Vec act(size_t(T_ * I_));
    if (!sites_) {
      const profile::Scope t("linear");
      linear_silu_mul(x.data(), T_, {view(wg), bg.empty() ? nullptr : bg.data(), nullptr},
                      {view(wu), bu.empty() ? nullptr : bu.data(), nullptr}, dt_, act.data());
      return act;
    }
    std::vector<Vec> gate_up =
        linear_sites_shared(l, x, {{n.gate_proj, wg, bg}, {n.up_proj, wu, bu}});
    {
      const profile::Scope t("elementwise");
      silu_mul(gate_up[0].data(), gate_up[1].data(), int64_t(act.size()), dt_, act.data());
    }
    site(l, n.prefix + "mlp.act", act, {T_, I_});
    return act;
  }

  template <typename WFn, typename BFn>
  Vec attention(int64_t l, const LayerNames& n, const Vec& x, WFn& W, BFn& B) {
    const int64_t qd = nH_ * D_, kvd = nKV_ * D_;
    std::vector<Vec> qkv =
        linear_sites_shared(l, x,
                            {{n.q_proj, W(n.q_proj, {qd, H_}), B(qkv_bias_, n.q_proj, qd)},
                             {n.k_proj, W(n.k_proj, {kvd, H_}), B(qkv_bias_, n.k_proj, kvd)},
                             {n.v_proj, W(n.v_proj, {kvd, H_}), B(qkv_bias_, n.v_proj, kvd)}});
    Vec q = std::move(qkv[0]), k = std::move(qkv[1]), v = std::move(qkv[2]);
    if (arch_.qk_norm) {  // Qwen3: RMSNorm over each head's D values, before RoPE
      q = rmsnorm_sites(l, n.q_norm, q, D_, param(W(n.q_norm, {D_}), D_), T_ * nH_, {T_, nH_, D_});
      k = rmsnorm_sites(l, n.k_norm, k, D_, param(W(n.k_norm, {D_}), D_), T_ * nKV_,
                        {T_, nKV_, D_});
    }
    {
      const profile::Scope t("rope");
      segment_rows([&](const Segment& g, int64_t a, int64_t b) {
        const RopeTables& tab = rope_.at(c_.rope.type == "dynamic" ? g.len : maxT_);
        apply_rope(q.data() + (g.off + a) * qd, b - a, nH_, tab, dt_, a);
        apply_rope(k.data() + (g.off + a) * kvd, b - a, nKV_, tab, dt_, a);
      });
    }
    if (sites_) {
      Vec qk(size_t(T_ * (nH_ + nKV_) * D_));
      for (int64_t t = 0; t < T_; ++t) {
        std::copy_n(q.data() + t * qd, qd, qk.data() + t * (qd + kvd));
        std::copy_n(k.data() + t * kvd, kvd, qk.data() + t * (qd + kvd) + qd);
      }
      site(l, n.prefix + "self_attn.rope", qk, {T_, nH_ + nKV_, D_});
    }
    Vec ctx;
    {
      const profile::Scope t("attention");
      ctx = att_ == AttentionProfile::Eager ? eager(l, n, q, k, v) : fused(l, n, q, k, v);
    }
    const bool ob = attn_bias_;
    return linear_site(l, n.o_proj, ctx, W(n.o_proj, {H_, qd}), B(ob, n.o_proj, H_));
  }

  // transformers' eager_attention_forward: s = round(q @ k^T); s = round(s * scaling);
  // s = round(s + mask) (mask finfo(dt).min above the diagonal, 0 elsewhere);
  // p = round(softmax_fp32(s)); o = round(p @ v). GQA: head h reads kv head h / (nH / nKV).
  // Scores above the diagonal are computed too: a NaN or inf there survives the mask and
  // poisons the whole row, as in torch.
  Vec eager(int64_t l, const LayerNames& n, const Vec& q, const Vec& k, const Vec& v) {
    const int64_t D = D_, rep = nH_ / nKV_, qd = nH_ * D, kvd = nKV_ * D;
    const float scaling = float(std::pow(double(D), -0.5));
    const float mask = dtype_lowest(dt_);
    // q, k, p and v hold bf16 values in a bf16 run: their products go to AMX where there is AMX.
    const bool amx = dt_ == DType::BF16 && gemm_amx::available();
    AttentionBuffers buf = attention_buffers();
    // Rows are taken kRowBlock at a time: two fp32 matrix products per block (scores, then
    // probabilities @ v) with the elementwise steps in between, row by row. Jobs (sequence,
    // head) are shared out with stealing; each worker keeps its scratch.
    struct Scratch {
      Vec sblk, pblk, oblk;
      gemm_amx::PackedB kt, vt;  // k and v of the job in tiles, packed once for all row blocks
    };
    std::vector<Scratch> scratch(size_t(std::min<int64_t>(default_threads(), buf.jobs)));
    parallel_for_stealing(buf.jobs, [&](int64_t worker, int64_t job) {
      Scratch& sc = scratch[size_t(worker)];
      if (sc.sblk.empty()) {
        sc.sblk.resize(static_cast<size_t>(kRowBlock * maxT_));
        sc.pblk.resize(sc.sblk.size());
        sc.oblk.resize(static_cast<size_t>(kRowBlock * D));
      }
      Vec &sblk = sc.sblk, &pblk = sc.pblk, &oblk = sc.oblk;
      gemm_amx::PackedB &kt = sc.kt, &vt = sc.vt;
      const Segment& g = segs_[size_t(job / nH_)];
      const int64_t h = job % nH_, kvh = h / rep, T = g.len;
      const float* qh = q.data() + g.off * qd + h * D;
      const float* kh = k.data() + g.off * kvd + kvh * D;
      const float* vh = v.data() + g.off * kvd + kvh * D;
      double& peak = buf.peak[size_t(job)];
      if (amx) {
        gemm_amx::pack_rows_n(kh, kvd, T, D, kt);
        gemm_amx::pack_rows_k(vh, kvd, T, D, vt);
      }
      for (int64_t i0 = 0; i0 < T; i0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, T - i0);
        float* S = buf.keep ? buf.s.data() + (h * T + i0) * T : sblk.data();
        float* P = buf.keep ? buf.p.data() + (h * T + i0) * T : pblk.data();
        if (amx)  // bf16 products on AMX tiles, as torch's bf16 matmul there
          gemm_amx::matmul_packed(qh + i0 * qd, qd, rows, kt, S, T);
        else
          sgemm_nt(qh + i0 * qd, qd, kh, kvd, S, T, rows, T, D);  // q @ k^T (all columns)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          float* si = S + r * T;
          float* pi = P + r * T;
          attention_scores_row(si, T, i, scaling, mask, dt_, peak);
          softmax_row(si, T, pi);
          round_inplace(pi, size_t(T), dt_);
        }
        if (amx)
          gemm_amx::matmul_packed(P, T, rows, vt, oblk.data(), D);
        else
          sgemm_nn(P, T, vh, kvd, oblk.data(), D, rows, D, T);  // p @ v
        round_inplace(oblk.data(), size_t(rows * D), dt_);
        for (int64_t r = 0; r < rows; ++r)
          std::copy_n(oblk.data() + r * D, D, buf.ctx.data() + (g.off + i0 + r) * qd + h * D);
      }
    });
    report_attention(l, n, buf);
    return std::move(buf.ctx);
  }

  // SDPA as torch's CPU flash-attention kernel computes it (transformers' `sdpa` on CPU; GPU
  // flash kernels keep the same fp32 scores and softmax): s = (q @ k^T) * scaling in fp32,
  // masked positions -inf; m = row max; e = exp(s - m), l = sum(e) in fp32; e is cast to the
  // run dtype for the e @ v product (fp32 accumulation); o = round((e @ v) * (1 / l)).
  // Bit-level details of that kernel, each confirmed by a golden: the columns in whole vectors
  // of kTorchLanes use torch's fexp_u20 (exp_u20 in fp32) and a lane-wise partial sum reduced as a
  // tree, the remaining columns std::exp and a sequential sum (llama-tiny-dynamic, T = 24); the max
  // ignores NaN in the remaining columns (std::max), and a row whose max is -inf (all masked,
  // or all NaN) gets probabilities 0 and an output of 0 * v (qwen3-example: NaN q, finite
  // output under SDPA, NaN under eager).
  static constexpr int64_t kTorchLanes = kTorchFloatLanes;
  static constexpr int64_t kRowBlock = 64;  // query rows per block of eager attention

  Vec fused(int64_t l, const LayerNames& n, const Vec& q, const Vec& k, const Vec& v) {
    const int64_t D = D_, rep = nH_ / nKV_, qd = nH_ * D, kvd = nKV_ * D;
    const float scaling = float(std::pow(double(D), -0.5));
    const float ninf = -std::numeric_limits<float>::infinity();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    AttentionBuffers buf = attention_buffers();
    parallel_for(buf.jobs, 1, [&](int64_t j0, int64_t j1) {
      Vec e(static_cast<size_t>(maxT_)), srow(e.size()), prow(e.size());
      for (int64_t job = j0; job < j1; ++job) {
        const Segment& g = segs_[size_t(job / nH_)];
        const int64_t h = job % nH_, kvh = h / rep, T = g.len;
        const int64_t nv = T / kTorchLanes * kTorchLanes;
        const float* qs = q.data() + g.off * qd;
        const float* ks = k.data() + g.off * kvd;
        const float* vs = v.data() + g.off * kvd;
        double& peak = buf.peak[size_t(job)];
        for (int64_t i = 0; i < T; ++i) {
          float* si = buf.keep ? buf.s.data() + (h * T + i) * T : srow.data();
          float* pi = buf.keep ? buf.p.data() + (h * T + i) * T : prow.data();
          const float* qi = qs + i * qd + h * D;
          for (int64_t j = 0; j < T; ++j) {
            float x = ninf;
            if (j <= i) {
              x = dot_f32(qi, ks + j * kvd + kvh * D, D) * scaling;
              if (std::isfinite(x)) peak = std::max(peak, double(std::fabs(x)));
            }
            si[j] = x;
          }
          float vmax = ninf, tmax = ninf;
          for (int64_t j = 0; j < nv; ++j)
            vmax = (std::isnan(vmax) || std::isnan(si[j])) ? nan : std::max(vmax, si[j]);
          for (int64_t j = nv; j < T; ++j) tmax = tmax < si[j] ? si[j] : tmax;
          const float m = tmax < vmax ? vmax : tmax;
          float sum = 0.0f;
          if (m == ninf) {
            std::fill(e.begin(), e.begin() + T, 0.0f);
          } else {
            float lanes[kTorchLanes] = {};
            for (int64_t j = 0; j < nv; ++j) {
              const float x = si[j] - m;
              e[size_t(j)] = dt_ == DType::F32 ? torch_exp_u20(x) : torch_fexp_u20(x);
              lanes[j % kTorchLanes] += e[size_t(j)];
            }
            if (nv > 0) sum = torch_lanes_sum(lanes);
            for (int64_t j = nv; j < T; ++j) {
              e[size_t(j)] = std::exp(si[j] - m);
              sum += e[size_t(j)];
            }
          }
          const float inv = 1.0f / (sum == 0.0f ? 1.0f : sum);
          for (int64_t j = 0; j < T; ++j) pi[j] = e[size_t(j)] * inv;
          for (int64_t j = 0; j < T; ++j) e[size_t(j)] = round_to(e[size_t(j)], dt_);
          // o[d] = sum_j p[j] v[j, d] with j in order for every d (rows of v read contiguously).
          float* o = buf.ctx.data() + (g.off + i) * qd + h * D;
          std::fill(o, o + D, 0.0f);
          for (int64_t j = 0; j < T; ++j) {
            const float pj = e[size_t(j)];
            const float* vj = vs + j * kvd + kvh * D;
            for (int64_t d = 0; d < D; ++d) o[d] += pj * vj[d];
          }
          for (int64_t d = 0; d < D; ++d) o[d] = round_to(o[d] * inv, dt_);
        }
      }
    });
    report_attention(l, n, buf);
    return std::move(buf.ctx);
  }

  // Attention's outputs and, when sites are reported (one sequence), its full scores and
  // probabilities [nH, T, T]; a batch keeps one row of each per thread instead.
  struct AttentionBuffers {
    bool keep = false;
    int64_t jobs = 0;  // (sequence, head) pairs
    Vec s, p, ctx;
    std::vector<double> peak;  // per job: the largest finite |score| before rounding
  };

  AttentionBuffers attention_buffers() const {
    AttentionBuffers b;
    b.keep = sites_;
    b.jobs = int64_t(segs_.size()) * nH_;
    if (b.keep) {
      b.s.resize(size_t(nH_ * T_ * T_));
      b.p.resize(b.s.size());
    }
    b.ctx.resize(size_t(T_ * nH_ * D_));
    b.peak.assign(size_t(b.jobs), 0.0);
    return b;
  }

  // fn(segment, a, b) for row ranges [a, b) of each segment, in parallel over all rows.
  template <typename Fn>
  void segment_rows(Fn&& fn) const {
    parallel_for(T_, 8, [&](int64_t r0, int64_t r1) {
      for (const Segment& g : segs_) {
        const int64_t a = std::max(r0, g.off), b = std::min(r1, g.off + g.len);
        if (a < b) fn(g, a - g.off, b - g.off);
      }
    });
  }

  void report_attention(int64_t l, const LayerNames& n, const AttentionBuffers& b) {
    if (!sites_) return;
    const int64_t T = T_;
    const Vec& s = b.s;
    // Masked scores may be -inf (fused, or fp16's min + negative score) without harm.
    bool finite = true;
    for (int64_t h = 0; h < nH_ && finite; ++h)
      for (int64_t i = 0; i < T && finite; ++i)
        for (int64_t j = 0; j < T; ++j) {
          const float x = s[size_t((h * T + i) * T + j)];
          const bool ok = j > i ? !(std::isnan(x) || x == std::numeric_limits<float>::infinity())
                                : std::isfinite(x);
          if (!ok) {
            finite = false;
            break;
          }
        }
    emit(l, n.prefix + "self_attn.scores", s, {nH_, T, T}, finite,
         *std::max_element(b.peak.begin(), b.peak.end()));
    site(l, n.prefix + "self_attn.probs", b.p, {nH_, T, T});
    site(l, n.prefix + "self_attn.context", b.ctx, {T, nH_ * D_});
  }

  // ---- building blocks ----
  Vec linear_site(int64_t l, const std::string& module, const Vec& x, const TensorRef& w,
                  const Vec& bias) {
    return std::move(linear_sites_shared(l, x, {{module, w, bias}})[0]);
  }

  // Linear layers of the same input (q/k/v, gate/up; one for linear_site), computed together (the
  // AMX path packs the input once), then reported in module order.
  struct LinearSpec {
    const std::string& module;
    TensorRef w;
    Vec bias;
  };
  std::vector<Vec> linear_sites_shared(int64_t l, const Vec& x, std::vector<LinearSpec> specs) {
    std::vector<Vec> outs;
    std::vector<LinearOutput> jobs;
    outs.reserve(specs.size());  // the jobs point into these
    for (const LinearSpec& sp : specs) {
      const WeightView wv = view(sp.w);
      outs.emplace_back(size_t(T_ * wv.rows));
      jobs.push_back({wv, sp.bias.empty() ? nullptr : sp.bias.data(), outs.back().data()});
    }
    {
      const profile::Scope t("linear");
      linear_shared_input(x.data(), T_, jobs, dt_);
    }
    for (size_t i = 0; i < specs.size(); ++i)
      site(l, specs[i].module, outs[i], {T_, jobs[i].w.rows});
    return outs;
  }

  Vec rmsnorm_sites(int64_t l, const std::string& module, const Vec& x, int64_t n, const Vec& w,
                    int64_t rows, std::initializer_list<int64_t> shape = {}) {
    Vec out(x.size());
    {
      const profile::Scope t("rmsnorm");
      rmsnorm(x.data(), rows, n, w.data(), c_.rms_norm_eps, dt_, out.data());
    }
    if (shape.size() == 0)
      site(l, module, out, {T_, n});
    else
      site(l, module, out, shape);
    return out;
  }

  TensorRef get(const std::string& name, std::initializer_list<int64_t> shape) {
    const TensorRef t = ck_.get(name);
    if (!is_float_computable(t.info->dtype))
      fail("{}: tensor {} has dtype {}; the forward pass reads F32, BF16 or F16",
           ck_.dir().string(), name, dtype_name(t.info->dtype));
    if (!std::equal(shape.begin(), shape.end(), t.info->shape.begin(), t.info->shape.end()))
      fail("{}: tensor {} has shape [{}], expected [{}] from config.json", ck_.dir().string(), name,
           fmt::join(t.info->shape, ", "), fmt::join(shape, ", "));
    return t;
  }

  WeightView view(const TensorRef& t) const {
    const auto& s = t.info->shape;
    return WeightView{t.bytes().data(), t.info->dtype, s.size() == 2 ? s[0] : 1,
                      s.size() == 2 ? s[1] : (s.empty() ? 1 : s[0])};
  }

  Vec param(const TensorRef& t, int64_t n) const {
    Vec out(static_cast<size_t>(n));
    weight_vector(t.bytes().data(), t.info->dtype, n, dt_, out.data());
    return out;
  }

  void release(const TensorRef& t) const {
    if (release_) t.release();
  }

  void site(int64_t l, const std::string& name, const Vec& v,
            std::initializer_list<int64_t> shape) {
    if (!sites_) return;
    emit(l, name, v, shape, all_finite(v), finite_abs_max(v));
  }

  void emit(int64_t l, const std::string& name, const Vec& v, std::initializer_list<int64_t> shape,
            bool finite, double peak) {
    if (!sites_) return;
    const std::vector<int64_t> sh(shape);
    SiteView sv;
    sv.layer = l;
    sv.name = name;
    sv.values = v;
    sv.shape = sh;
    sv.finite = finite;
    sv.peak_abs = peak;
    obs_->site(sv);
    if (obs_->done()) throw StopForward{};
  }

  void hidden(int64_t index, const Vec& h) {
    if (!obs_) return;
    const profile::Scope t("observer");
    obs_->hidden_state(index, h, T_, H_);
    if (obs_->done()) throw StopForward{};
  }

  const Checkpoint& ck_;
  const ModelConfig& c_;
  const Architecture& arch_;
  DType dt_;
  AttentionProfile att_;
  bool release_;
  Observer* obs_;
  bool sites_;  // report sites: an observer that wants them and a single sequence
  std::vector<Segment> segs_;
  int64_t T_ = 0, maxT_ = 0;  // all rows; the longest sequence
  int64_t H_ = 0, I_ = 0, D_ = 0, nH_ = 0, nKV_ = 0;
  bool attn_bias_ = false, qkv_bias_ = false, mlp_bias_ = false;
  std::map<int64_t, RopeTables> rope_;  // by sequence length (see the constructor)
};

template <typename Embed>
ForwardResult run_model(const Checkpoint& ck, std::span<const int64_t> lengths,
                        const ForwardOptions& opt, Observer* obs, Embed&& embed) {
  int64_t T = 0;
  for (int64_t len : lengths) {
    if (len <= 0) fail("forward: a sequence without tokens");
    T += len;
  }
  if (T <= 0) fail("forward: no input tokens");
  ForwardResult res;
  res.tokens = T;
  res.hidden = ck.config().hidden_size;
  res.vocab = ck.config().vocab_size;
  // At the end, after the model's arrays are back in the cache (m dies first): report the
  // profile and hand the cached arrays back to the system.
  struct EndOfPass {
    ~EndOfPass() {
      profile::print_and_reset("forward");
      activation_cache::trim();
    }
  } end_of_pass;
  Model m(ck, opt, obs, lengths);
  try {
    const Vec logits = m.run(embed(m));
    res.logits.assign(logits.begin(), logits.end());
  } catch (const StopForward&) {
    res.stopped_early = true;
  }
  return res;
}

Vec rounded_embeddings(std::span<const float> embeddings, int64_t T, int64_t H, DType dt) {
  if (T < 0 || int64_t(embeddings.size()) != T * H)
    fail("forward: input embeddings hold {} values, expected [{}, {}] = {}", embeddings.size(), T,
         H, T * H);
  Vec h(embeddings.begin(), embeddings.end());
  round_inplace(h.data(), h.size(), dt);
  return h;
}

}  // namespace

ForwardResult forward(const Checkpoint& ck, std::span<const int64_t> ids, const ForwardOptions& opt,
                      Observer* obs) {
  const int64_t T = int64_t(ids.size());
  return run_model(ck, std::span<const int64_t>(&T, 1), opt, obs,
                   [&](Model& m) { return m.embed(ids); });
}

ForwardResult forward_embeddings(const Checkpoint& ck, std::span<const float> embeddings, int64_t T,
                                 const ForwardOptions& opt, Observer* obs) {
  return run_model(ck, std::span<const int64_t>(&T, 1), opt, obs, [&](Model&) {
    return rounded_embeddings(embeddings, T, ck.config().hidden_size, opt.dtype);
  });
}

ForwardResult forward_batch(const Checkpoint& ck, std::span<const float> embeddings,
                            std::span<const int64_t> lengths, const ForwardOptions& opt,
                            Observer* obs) {
  int64_t T = 0;
  for (int64_t len : lengths) T += len;
  return run_model(ck, lengths, opt, obs, [&](Model&) {
    return rounded_embeddings(embeddings, T, ck.config().hidden_size, opt.dtype);
  });
}

}  // namespace nanscope
