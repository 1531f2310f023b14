// The forward pass as a recipe: Norm; Attention; (Norm;) Residual; Norm; MLP or experts; (Norm;)
// Residual, read from the layer description of model/arch.hpp. Every rounding point is the one
// of transformers' modeling code of the family on CPU (docs/forward.md lists them with the code
// they mirror).
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
#include <set>
#include <string>

#include "common/error.hpp"
#include "common/interrupt_check.hpp"
#include "common/strings.hpp"
#include "cuda/forward_cuda.hpp"
#include "model/adapter_overlay.hpp"
#include "model/arch.hpp"
#include "model/rope.hpp"
#include "model/weights.hpp"
#include "numerics/activations.hpp"
#include "numerics/elementwise.hpp"
#include "numerics/gemm_amx.hpp"
#include "numerics/kernels.hpp"
#include "numerics/parallel.hpp"
#include "numerics/profile.hpp"
#include "numerics/stats.hpp"

namespace nanscope {

std::string_view attention_name(AttentionProfile a) {
  return a == AttentionProfile::Eager ? "eager" : "fused";
}

std::optional<AttentionProfile> parse_attention(std::string_view s0) {
  const std::string s = ascii_lower(s0);
  if (s == "eager") return AttentionProfile::Eager;
  if (s == "fused" || s == "sdpa") return AttentionProfile::Fused;
  return std::nullopt;
}

namespace {

using Vec = Activations;

struct StopForward {};

// Every id within the vocabulary (the host's embedding checks it as it reads the row; a GPU
// gather is handed checked ids).
void check_token_ids(std::span<const int64_t> ids, int64_t vocab) {
  for (size_t t = 0; t < ids.size(); ++t)
    if (ids[t] < 0 || ids[t] >= vocab)
      fail("forward: token id {} (position {}) is out of range: vocab_size is {}", ids[t], t,
           vocab);
}

double finite_abs_max(std::span<const float> v) {
  double m = 0;
  for (float f : v)
    if (std::isfinite(f)) m = std::max(m, double(std::fabs(f)));
  return m;
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
  // `cache` (one sequence only): the positions before these tokens, whose keys and values the
  // attention reads and to which this pass appends its own.
  Model(const Checkpoint& ck, const ForwardOptions& opt, Observer* obs,
        std::span<const int64_t> lengths, KvCache* cache = nullptr, bool last_logits = false)
      : ck_(ck),
        c_(ck.config()),
        spec_(model_spec(c_)),
        dt_(opt.dtype),
        att_(opt.attention),
        obs_(obs),
        ov_(opt.adapter),
        sites_(obs != nullptr && obs->wants_sites() && lengths.size() == 1),
        weights_(ck, opt.dtype, opt.release_pages, opt.adapter, opt.resident),
        cache_(cache),
        last_logits_(last_logits) {
    if (cache_) {
      if (lengths.size() != 1) fail("forward: a key/value cache holds one sequence");
      P_ = cache_->past;
      if (cache_->k.empty()) {
        cache_->k.resize(spec_.layers.size());
        cache_->v.resize(spec_.layers.size());
        cache_->start.assign(spec_.layers.size(), 0);
      }
    }
    for (int64_t len : lengths) {
      segs_.push_back({T_, len});
      T_ += len;
      maxT_ = std::max(maxT_, len);
    }
    if (!is_float_computable(dt_))
      fail("forward: run dtype {} is not one of F32, BF16, F16", dtype_name(dt_));
    H_ = spec_.hidden;
    if (ov_) check_adapter_modules();
    // cos/sin at a position do not depend on the sequence length, except for `dynamic` and
    // `longrope` (their frequencies follow the length): one table per distinct length then.
    for (const LayerSpec& s : spec_.layers)
      for (const Segment& g : segs_) {
        const auto key = rope_key_for(s.attn.rope, g.len);
        if (!rope_.contains(key))
          rope_.emplace(key, rope_tables(c_, spec_.ropes[size_t(s.attn.rope)], s.attn.rotary_dim,
                                         key.second, dt_, P_));  // rows before P_ go unread
      }
  }

  Vec embed(std::span<const int64_t> ids) {
    const WeightView w = weights_.matrix(spec_.embed, spec_.vocab, H_);
    Vec h(size_t(T_ * H_));
    check_token_ids(ids.first(size_t(T_)), spec_.vocab);
    for (int64_t t = 0; t < T_; ++t) weight_rows(w, ids[size_t(t)], 1, dt_, h.data() + t * H_);
    if (ov_) adapt_embeddings(w, ids, h);
    scale_embeddings(spec_, h.data(), h.size(), dt_);  // Gemma
    site(-1, spec_.embed, h, {T_, H_});
    weights_.release_all();
    return h;
  }

  uint64_t weight_bytes() const { return weights_.bytes_read(); }
  const ModelSpec& spec() const { return spec_; }
  bool reports_sites() const { return sites_; }

  // Decoder layers, final norm and lm_head, from the embeddings h [T, H].
  Vec run(Vec h) {
    hidden(0, h);
    const int64_t N = int64_t(spec_.layers.size());
    for (int64_t l = 0; l < N; ++l) {
      check_interrupt();
      layer(spec_.layers[size_t(l)], h);
      if (l + 1 < N) hidden(l + 1, h);
    }
    Vec x = norm(-1, spec_.final_norm, h, weights_.vector(spec_.final_norm, "weight", H_), H_, T_);
    hidden(N, x);
    if (last_logits_) x.erase(x.begin(), x.end() - H_);
    // A tied model's lm_head is the embedding, unless an adapter saved a trained copy of it
    // (modules_to_save), which PeftModel then uses instead.
    const bool own_head = ov_ && ov_->replacement(spec_.lm_head + ".weight");
    const WeightView lm =
        weights_.matrix(spec_.tied && !own_head ? spec_.embed : spec_.lm_head, spec_.vocab, H_);
    Vec logits = linear_site(-1, spec_.lm_head, x, lm, Vec{});
    if (spec_.final_softcap) {  // Gemma 2: logits = cap * tanh(logits / cap)
      softcap_inplace(logits.data(), int64_t(logits.size()), *spec_.final_softcap, dt_);
      site(-1, "final_logit_softcapping", logits,
           {int64_t(logits.size()) / spec_.vocab, spec_.vocab});
    }
    weights_.release_all();
    return logits;
  }

 private:
  // ---- one decoder layer: the recipe ----
  void layer(const LayerSpec& s, Vec& h) {
    const int64_t l = s.index;
    const LayerNames& n = s.names;
    const LayerWeights w = weights_.layer(s, H_);

    Vec x = norm(l, n.input_norm, h, w.input_norm, H_, T_);
    Vec a = attention(s, w, x);
    if (!n.attn_out_norm.empty()) a = norm(l, n.attn_out_norm, a, w.attn_out_norm, H_, T_);
    h = residual(l, n.prefix + "residual_attn", h, a);

    x = norm(l, n.mlp_in_norm, h, w.mlp_in_norm, H_, T_);
    Vec m = s.mlp.moe ? moe(s, w, x) : mlp(l, n, s.mlp, w, x);
    if (!n.mlp_out_norm.empty()) m = norm(l, n.mlp_out_norm, m, w.mlp_out_norm, H_, T_);
    h = residual(l, n.prefix + "residual_mlp", h, m);

    weights_.release_all();
  }

  Vec residual(int64_t l, const std::string& name, const Vec& h, const Vec& y) {
    Vec r(h.size());
    {
      const profile::Scope t("elementwise");
      add_round(h.data(), y.data(), int64_t(h.size()), dt_, r.data());
    }
    site(l, name, r, {T_, H_});
    return r;
  }

  // act = activation(gate_proj(x)) * up_proj(x); down_proj(act). Without observed sites and
  // with SiLU the products and the activation run as one step (linear_silu_mul: on AMX, gate
  // and up are combined in cache, never written).
  // `report` false: an expert of a mixture (no sites, no adapter).
  Vec mlp(int64_t l, const LayerNames& n, const MlpSpec& m, const LayerWeights& w, const Vec& x,
          bool report = true) {
    const int64_t I = w.gate.rows, rows = int64_t(x.size()) / H_;
    Vec act(size_t(rows * I));
    const float* bg = w.gate_bias.empty() ? nullptr : w.gate_bias.data();
    const float* bu = w.up_bias.empty() ? nullptr : w.up_bias.data();
    const std::string gate_mod = m.fused_gate_up ? n.gate_up_proj : n.gate();
    const std::string up_mod = m.fused_gate_up ? n.gate_up_proj : n.up();
    const std::string down_mod = n.down();
    const LoraBranch* lg = report ? lora_for(gate_mod) : nullptr;
    const LoraBranch* lu = report ? lora_for(up_mod) : nullptr;
    const LoraBranch* ld = report ? lora_for(down_mod) : nullptr;
    const WeightView gw = m.fused_gate_up ? w.gate_up : w.gate;
    const WeightView uw = m.fused_gate_up ? w.gate_up : w.up;
    if ((!sites_ || !report) && m.act == Activation::Silu && !lg && !lu) {
      const profile::Scope t("linear.gate_up");
      linear_silu_mul(x.data(), rows, {w.gate, bg, nullptr}, {w.up, bu, nullptr}, dt_, act.data());
    } else {
      Vec g(size_t(rows * I)), u(g.size());
      const LinearOutput outs[2] = {{w.gate, bg, g.data()}, {w.up, bu, u.data()}};
      {
        const profile::Scope t("linear.gate_up");
        linear_shared_input(x.data(), rows, outs, dt_);
      }
      if (lg) apply_lora_linear(*ov_, *lg, gw, x.data(), rows, 0, I, bg, dt_, g.data());
      if (lu)
        apply_lora_linear(*ov_, *lu, uw, x.data(), rows, m.fused_gate_up ? I : 0, I, bu, dt_,
                          u.data());
      if (report) {
        site(l, n.gate(), g, {T_, I});
        site(l, n.up(), u, {T_, I});
      }
      const profile::Scope t("elementwise");
      if (m.act == Activation::Silu)
        silu_mul(g.data(), u.data(), int64_t(act.size()), dt_, act.data());
      else
        gelu_tanh_mul(g.data(), u.data(), int64_t(act.size()), dt_, act.data());
    }
    if (report) site(l, n.prefix + "mlp.act", act, {T_, I});
    Vec down(size_t(rows * H_));
    {
      const profile::Scope t("linear.down");
      const float* bd = w.down_bias.empty() ? nullptr : w.down_bias.data();
      linear(act.data(), rows, w.down, bd, dt_, down.data());
      if (ld) apply_lora_linear(*ov_, *ld, w.down, act.data(), rows, 0, H_, bd, dt_, down.data());
    }
    if (report) site(l, down_mod, down, {T_, H_});
    return down;
  }

  // Mixture of experts as transformers 5 computes it (its default grouped experts kernel,
  // integrations/moe.py): router logits in the run dtype, softmax in fp32, top-k (renormalised
  // where the family does), weights cast to the run dtype (Qwen) or kept in fp32 (Mixtral);
  // each expert's MLP on the tokens routed to it, times their weight (the product rounded only
  // when both are in the run dtype); per token the top-k products summed in fp32 in rank order
  // and rounded once. Only the experts that some token routes to are read.
  Vec moe(const LayerSpec& s, const LayerWeights& w, const Vec& x) {
    const int64_t l = s.index, E = s.mlp.experts, K = s.mlp.top_k, I = s.mlp.intermediate;
    const LayerNames& n = s.names;
    Vec logits = linear_site(l, n.prefix + "mlp.gate", x, w.router, Vec{});  // HF's module name
    // Per expert, (token, rank) in token order; weight[t * K + k] of token t's rank-k expert.
    std::vector<std::vector<std::pair<int64_t, int64_t>>> routed(static_cast<size_t>(E));
    std::vector<float> weight(static_cast<size_t>(T_ * K));
    {
      std::vector<float> p(static_cast<size_t>(E));
      std::vector<int64_t> idx(static_cast<size_t>(E));
      for (int64_t t = 0; t < T_; ++t) {
        softmax_row(logits.data() + t * E, E, p.data());
        for (int64_t e = 0; e < E; ++e) idx[size_t(e)] = e;
        // torch.topk: largest first; equal values keep the lower index first.
        std::stable_sort(idx.begin(), idx.end(),
                         [&](int64_t a, int64_t b) { return p[size_t(a)] > p[size_t(b)]; });
        float sum = 0.0f;
        for (int64_t k = 0; k < K; ++k) sum += p[size_t(idx[size_t(k)])];
        for (int64_t k = 0; k < K; ++k) {
          float wk = p[size_t(idx[size_t(k)])];
          if (s.mlp.norm_topk) wk = wk / sum;
          if (s.mlp.router_in_dtype) wk = round_to(wk, dt_);
          weight[size_t(t * K + k)] = wk;
          routed[size_t(idx[size_t(k)])].push_back({t, k});
        }
      }
    }
    Vec prod(size_t(T_ * K * H_));  // [T, K, H]: each token's weighted expert outputs by rank
    // The routed experts' weights, taken in order (the source is not thread-safe), then the
    // experts computed side by side: one expert per worker, its products single-threaded
    // inside (nested parallel loops run inline), each (token, rank) row written by one expert.
    std::vector<int64_t> active;
    std::vector<LayerWeights> ew(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      if (routed[size_t(e)].empty()) continue;
      active.push_back(e);
      ew[size_t(e)].gate = weights_.matrix(n.expert(e, n.expert_gate), I, H_);
      ew[size_t(e)].up = weights_.matrix(n.expert(e, n.expert_up), I, H_);
      ew[size_t(e)].down = weights_.matrix(n.expert(e, n.expert_down), H_, I);
    }
    parallel_for_stealing(int64_t(active.size()), [&](int64_t, int64_t job) {
      const int64_t e = active[size_t(job)];
      const auto& toks = routed[size_t(e)];
      const int64_t ne = int64_t(toks.size());
      Vec xe(size_t(ne * H_));
      for (int64_t r = 0; r < ne; ++r)
        std::copy_n(x.data() + toks[size_t(r)].first * H_, H_, xe.data() + r * H_);
      const Vec d = mlp(l, n, s.mlp, ew[size_t(e)], xe, false);
      for (int64_t r = 0; r < ne; ++r) {
        const auto [t, k] = toks[size_t(r)];
        const float wk = weight[size_t(t * K + k)];
        float* pr = prod.data() + (t * K + k) * H_;
        for (int64_t j = 0; j < H_; ++j) {
          const float c = d[size_t(r * H_ + j)] * wk;
          pr[j] = s.mlp.router_in_dtype ? round_to(c, dt_) : c;
        }
      }
    });
    Vec out(size_t(T_ * H_));
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t j = 0; j < H_; ++j) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) acc += prod[size_t((t * K + k) * H_ + j)];
        out[size_t(t * H_ + j)] = round_to(acc, dt_);
      }
    if (s.mlp.shared_intermediate > 0) {  // Qwen2-MoE: + sigmoid(gate(x)) * shared_expert(x)
      LayerWeights sw;
      sw.gate = w.shared_gate, sw.up = w.shared_up, sw.down = w.shared_down;
      const Vec sh = mlp(l, n, s.mlp, sw, x, false);
      Vec g(static_cast<size_t>(T_));
      linear(x.data(), T_, w.shared_expert_gate, nullptr, dt_, g.data());
      Vec scaled(sh.size());
      sigmoid_scale_rows(g.data(), sh.data(), T_, H_, dt_, scaled.data());
      add_round(out.data(), scaled.data(), int64_t(out.size()), dt_, out.data());
    }
    site(l, n.prefix + "mlp", out, {T_, H_});
    return out;
  }

  Vec attention(const LayerSpec& s, const LayerWeights& w, const Vec& x) {
    const int64_t l = s.index;
    const LayerNames& n = s.names;
    const AttentionSpec& a = s.attn;
    const int64_t D = a.head_dim, qd = a.heads * D, kvd = a.kv_heads * D;
    const std::string& p = n.prefix;
    // A fused qkv_proj has one LoRA over all its rows: q, k and v take their row ranges.
    const bool f = a.fused_qkv;
    std::vector<Vec> qkv = linear_sites_shared(
        l, x,
        {{p + "self_attn.q_proj", w.q, w.q_bias, f ? n.qkv_proj : "", w.qkv, 0},
         {p + "self_attn.k_proj", w.k, w.k_bias, f ? n.qkv_proj : "", w.qkv, qd},
         {p + "self_attn.v_proj", w.v, w.v_bias, f ? n.qkv_proj : "", w.qkv, qd + kvd}});
    Vec q = std::move(qkv[0]), k = std::move(qkv[1]), v = std::move(qkv[2]);
    if (a.qk_norm) {  // RMSNorm over each head's D values, before RoPE
      q = norm(l, n.q_norm, q, w.q_norm, D, T_ * a.heads, {T_, a.heads, D});
      k = norm(l, n.k_norm, k, w.k_norm, D, T_ * a.kv_heads, {T_, a.kv_heads, D});
    }
    {
      const profile::Scope t("rope");
      segment_rows([&](const Segment& g, int64_t r0, int64_t r1) {
        const RopeTables& tab = rope_.at(rope_key_for(a.rope, g.len));
        apply_rope(q.data() + (g.off + r0) * qd, r1 - r0, a.heads, tab, dt_, P_ + r0, D);
        apply_rope(k.data() + (g.off + r0) * kvd, r1 - r0, a.kv_heads, tab, dt_, P_ + r0, D);
      });
    }
    if (sites_) {
      Vec qk(size_t(T_ * (qd + kvd)));
      for (int64_t t = 0; t < T_; ++t) {
        std::copy_n(q.data() + t * qd, qd, qk.data() + t * (qd + kvd));
        std::copy_n(k.data() + t * kvd, kvd, qk.data() + t * (qd + kvd) + qd);
      }
      site(l, p + "self_attn.rope", qk, {T_, a.heads + a.kv_heads, D});
    }
    Vec ctx;
    {
      const profile::Scope t("attention");
      // With a cache the keys are the cached ones followed by these (transformers' DynamicCache);
      // a sliding-window layer's cache keeps the last window - 1 positions only.
      Keys keys{k.data(), v.data(), T_, 0};
      if (cache_) {
        std::vector<float>& ck = cache_->k[size_t(l)];
        std::vector<float>& cv = cache_->v[size_t(l)];
        ck.insert(ck.end(), k.begin(), k.end());
        cv.insert(cv.end(), v.begin(), v.end());
        keys = Keys{ck.data(), cv.data(), int64_t(ck.size()) / kvd, cache_->start[size_t(l)]};
      }
      ctx = att_ == AttentionProfile::Eager ? eager(l, n, a, q, keys) : fused(l, n, a, q, keys);
      if (cache_ && a.window > 0) {
        std::vector<float>& ck = cache_->k[size_t(l)];
        std::vector<float>& cv = cache_->v[size_t(l)];
        const int64_t rows = int64_t(ck.size()) / kvd, drop = rows - (a.window - 1);
        if (drop > 0) {
          ck.erase(ck.begin(), ck.begin() + drop * kvd);
          cv.erase(cv.begin(), cv.begin() + drop * kvd);
          cache_->start[size_t(l)] += drop;
        }
      }
    }
    return linear_site(l, n.o_proj, ctx, w.o, w.o_bias);
  }

  // The keys and values attention reads: [rows, kv_heads * head_dim], row 0 at absolute
  // position `pos0` (0 without a cache; later when a sliding window dropped earlier ones).
  struct Keys {
    const float* k;
    const float* v;
    int64_t rows;  // all sequences' rows without a cache; the cached rows with one
    int64_t pos0;
  };
  // Keys of a segment of Tq queries: how many, and the column of query 0's own position.
  int64_t key_count(const Keys& kv, int64_t Tq) const { return cache_ ? kv.rows : Tq; }
  int64_t query_col0(const Keys& kv) const { return cache_ ? P_ - kv.pos0 : 0; }

  // transformers' eager_attention_forward: s = round(q @ k^T); s = round(s * scaling);
  // soft-capping (Gemma 2) s = round(round(tanh(round(s / cap))) * cap); s = round(s + mask)
  // (mask finfo(dt).min where the key is not visible: above the diagonal, or out of the
  // sliding window); p = round(softmax_fp32(s)); o = round(p @ v). GQA: head h reads kv head
  // h / (nH / nKV). Masked scores are computed too: a NaN or inf there survives the mask and
  // poisons the whole row, as in torch.
  Vec eager(int64_t l, const LayerNames& n, const AttentionSpec& a, const Vec& q, const Keys& kv) {
    const int64_t D = a.head_dim, rep = a.heads / a.kv_heads, qd = a.heads * D,
                  kvd = a.kv_heads * D;
    const float scaling = a.scaling;
    const float mask = dtype_lowest(dt_);
    const bool plain = a.window == 0 && !a.softcap;
    // q, k, p and v hold bf16 values in a bf16 run: their products go to AMX where there is AMX.
    const bool amx = is_amx(choose_attention_path(dt_));
    const float *k = kv.k, *v = kv.v;
    const int64_t c0 = query_col0(kv);
    AttentionBuffers buf = attention_buffers(a, kv);
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
        sc.sblk.resize(static_cast<size_t>(kRowBlock * buf.max_keys));
        sc.pblk.resize(sc.sblk.size());
        sc.oblk.resize(static_cast<size_t>(kRowBlock * D));
      }
      Vec &sblk = sc.sblk, &pblk = sc.pblk, &oblk = sc.oblk;
      gemm_amx::PackedB &kt = sc.kt, &vt = sc.vt;
      const Segment& g = segs_[size_t(job / a.heads)];
      const int64_t h = job % a.heads, kvh = h / rep, T = g.len, L = key_count(kv, T);
      const float* qh = q.data() + g.off * qd + h * D;
      const float* kh = k + (cache_ ? 0 : g.off) * kvd + kvh * D;
      const float* vh = v + (cache_ ? 0 : g.off) * kvd + kvh * D;
      double& peak = buf.peak[size_t(job)];
      if (amx) {
        gemm_amx::pack_rows_n(kh, kvd, L, D, kt);
        gemm_amx::pack_rows_k(vh, kvd, L, D, vt);
      }
      for (int64_t i0 = 0; i0 < T; i0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, T - i0);
        float* S = buf.keep ? buf.s.data() + (h * T + i0) * L : sblk.data();
        float* P = buf.keep ? buf.p.data() + (h * T + i0) * L : pblk.data();
        if (amx)  // bf16 products on AMX tiles, as torch's bf16 matmul there
          gemm_amx::matmul_packed(qh + i0 * qd, qd, rows, kt, S, L);
        else
          sgemm_nt(qh + i0 * qd, qd, kh, kvd, S, L, rows, L, D);  // q @ k^T (all columns)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = c0 + i0 + r;  // the column of this query's own position
          float* si = S + r * L;
          float* pi = P + r * L;
          if (plain)
            attention_scores_row(si, L, i, scaling, mask, dt_, peak);
          else
            attention_scores_row_window(si, L, i, a.window, scaling, a.softcap.value_or(0.0f), mask,
                                        dt_, peak);
          softmax_row(si, L, pi);
          round_inplace(pi, size_t(L), dt_);
        }
        if (amx)
          gemm_amx::matmul_packed(P, L, rows, vt, oblk.data(), D);
        else
          sgemm_nn(P, L, vh, kvd, oblk.data(), D, rows, D, L);  // p @ v
        round_inplace(oblk.data(), size_t(rows * D), dt_);
        for (int64_t r = 0; r < rows; ++r)
          std::copy_n(oblk.data() + r * D, D, buf.ctx.data() + (g.off + i0 + r) * qd + h * D);
      }
    });
    report_attention(l, n, a, buf, c0);
    return std::move(buf.ctx);
  }

  // SDPA as torch's CPU flash-attention kernel computes it (transformers' `sdpa` on CPU; GPU
  // flash kernels keep the same fp32 scores and softmax): s = (q @ k^T) * scaling in fp32,
  // masked positions (causal, sliding window) -inf; m = row max; e = exp(s - m), l = sum(e) in
  // fp32; e is cast to the run dtype for the e @ v product (fp32 accumulation);
  // o = round((e @ v) * (1 / l)). transformers' sdpa path has no soft-capping (Gemma 2's
  // attn_logit_softcapping is applied by eager only), and neither does this one.
  // Bit-level details of that kernel, each confirmed by a golden: the columns in whole vectors
  // of kTorchLanes use torch's fexp_u20 (exp_u20 in fp32) and a lane-wise partial sum reduced as a
  // tree, the remaining columns std::exp and a sequential sum (llama-tiny-dynamic, T = 24); the max
  // ignores NaN in the remaining columns (std::max), and a row whose max is -inf (all masked,
  // or all NaN) gets probabilities 0 and an output of 0 * v (qwen3-example: NaN q, finite
  // output under SDPA, NaN under eager).
  static constexpr int64_t kTorchLanes = kTorchFloatLanes;
  static constexpr int64_t kRowBlock = 64;  // query rows per block of eager attention

  Vec fused(int64_t l, const LayerNames& n, const AttentionSpec& a, const Vec& q, const Keys& kv) {
    const int64_t D = a.head_dim, rep = a.heads / a.kv_heads, qd = a.heads * D,
                  kvd = a.kv_heads * D;
    const float scaling = a.scaling;
    const float ninf = -std::numeric_limits<float>::infinity();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float *k = kv.k, *v = kv.v;
    const int64_t c0 = query_col0(kv);
    AttentionBuffers buf = attention_buffers(a, kv);
    parallel_for(buf.jobs, 1, [&](int64_t j0, int64_t j1) {
      Vec e(static_cast<size_t>(buf.max_keys)), srow(e.size()), prow(e.size());
      for (int64_t job = j0; job < j1; ++job) {
        const Segment& g = segs_[size_t(job / a.heads)];
        const int64_t h = job % a.heads, kvh = h / rep, Tq = g.len, T = key_count(kv, Tq);
        const int64_t nv = T / kTorchLanes * kTorchLanes;
        const float* qs = q.data() + g.off * qd;
        const float* ks = k + (cache_ ? 0 : g.off) * kvd;
        const float* vs = v + (cache_ ? 0 : g.off) * kvd;
        double& peak = buf.peak[size_t(job)];
        for (int64_t iq = 0; iq < Tq; ++iq) {
          const int64_t i = c0 + iq;  // the column of this query's own position
          float* si = buf.keep ? buf.s.data() + (h * Tq + iq) * T : srow.data();
          float* pi = buf.keep ? buf.p.data() + (h * Tq + iq) * T : prow.data();
          const float* qi = qs + iq * qd + h * D;
          for (int64_t j = 0; j < T; ++j) {
            float x = ninf;
            if (!masked_key(i, j, a.window)) {
              x = dot_f32(qi, ks + j * kvd + kvh * D, D) * scaling;
              if (std::isfinite(x)) peak = std::max(peak, double(std::fabs(x)));
            }
            si[j] = x;
          }
          float vmax = ninf, tmax = ninf;
          for (int64_t j = 0; j < nv; ++j)
            vmax = (std::isnan(vmax) || std::isnan(si[j])) ? nan : std::max(vmax, si[j]);
          for (int64_t j = nv; j < T; ++j) tmax = tmax < si[j] ? si[j] : tmax;
          // torch combines them as max(vector max, tail max): a NaN among the vector columns
          // wins (the row turns NaN), a NaN in the tail alone is skipped (poisoned: T = 17).
          const float m = vmax < tmax ? tmax : vmax;
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
          float* o = buf.ctx.data() + (g.off + iq) * qd + h * D;
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
    report_attention(l, n, a, buf, c0);
    return std::move(buf.ctx);
  }

  // Attention's outputs and, when sites are reported (one sequence), its full scores and
  // probabilities [nH, T, T]; a batch keeps one row of each per thread instead.
  struct AttentionBuffers {
    bool keep = false;
    int64_t jobs = 0;      // (sequence, head) pairs
    int64_t max_keys = 0;  // the most keys a query row sees
    int64_t keys = 0;      // columns of s and p (one sequence)
    Vec s, p, ctx;
    std::vector<double> peak;  // per job: the largest finite |score| before rounding
  };

  AttentionBuffers attention_buffers(const AttentionSpec& a, const Keys& kv) const {
    AttentionBuffers b;
    b.keep = sites_;
    b.jobs = int64_t(segs_.size()) * a.heads;
    b.max_keys = key_count(kv, maxT_);
    b.keys = b.max_keys;
    if (b.keep) {
      b.s.resize(size_t(a.heads * T_ * b.keys));
      b.p.resize(b.s.size());
    }
    b.ctx.resize(size_t(T_ * a.heads * a.head_dim));
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

  void report_attention(int64_t l, const LayerNames& n, const AttentionSpec& a,
                        const AttentionBuffers& b, int64_t c0) {
    if (!sites_) return;
    const int64_t T = T_, L = b.keys;
    const Vec& s = b.s;
    // Masked scores may be -inf (fused, or fp16's min + negative score) without harm.
    bool finite = true;
    for (int64_t h = 0; h < a.heads && finite; ++h)
      for (int64_t i = 0; i < T && finite; ++i)
        for (int64_t j = 0; j < L; ++j) {
          const float x = s[size_t((h * T + i) * L + j)];
          const bool ok = masked_key(c0 + i, j, a.window)
                              ? !(std::isnan(x) || x == std::numeric_limits<float>::infinity())
                              : std::isfinite(x);
          if (!ok) {
            finite = false;
            break;
          }
        }
    emit(l, n.prefix + "self_attn.scores", s, {a.heads, T, L}, finite,
         *std::max_element(b.peak.begin(), b.peak.end()));
    site(l, n.prefix + "self_attn.probs", b.p, {a.heads, T, L});
    site(l, n.prefix + "self_attn.context", b.ctx, {T, a.heads * a.head_dim});
  }

  // ---- building blocks ----
  Vec linear_site(int64_t l, const std::string& module, const Vec& x, const WeightView& w,
                  const Vec& bias, bool report = true) {
    return std::move(linear_sites_shared(l, x, {{module, w, bias}}, report)[0]);
  }

  // Linear layers of the same input (q/k/v, gate/up; one for linear_site), computed together (the
  // AMX path packs the input once), then reported in module order.
  struct LinearSpec {
    std::string module;
    WeightView w;
    const Vec& bias;
    // The adapter's module when it is not `module` (a fused tensor), its whole weight, and
    // where this output's rows start in it.
    std::string lora_module = {};
    WeightView lora_w = {};
    int64_t lora_row0 = 0;
  };
  std::vector<Vec> linear_sites_shared(int64_t l, const Vec& x, std::vector<LinearSpec> specs,
                                       bool report = true) {
    const int64_t rows = int64_t(x.size()) / specs[0].w.cols;
    std::vector<Vec> outs;
    std::vector<LinearOutput> jobs;
    outs.reserve(specs.size());  // the jobs point into these
    for (const LinearSpec& sp : specs) {
      outs.emplace_back(size_t(rows * sp.w.rows));
      jobs.push_back({sp.w, sp.bias.empty() ? nullptr : sp.bias.data(), outs.back().data()});
    }
    {
      const profile::Scope t(profile::enabled() ? linear_kind(specs[0].module) : "linear");
      linear_shared_input(x.data(), rows, jobs, dt_);
    }
    if (ov_)
      for (size_t i = 0; i < specs.size(); ++i) {
        const LinearSpec& sp = specs[i];
        const bool fused = !sp.lora_module.empty();
        if (const LoraBranch* b = lora_for(fused ? sp.lora_module : sp.module))
          apply_lora_linear(*ov_, *b, fused ? sp.lora_w : sp.w, x.data(), rows,
                            fused ? sp.lora_row0 : 0, jobs[i].w.rows, jobs[i].bias, dt_,
                            outs[i].data());
      }
    if (report)
      for (size_t i = 0; i < specs.size(); ++i)
        site(l, specs[i].module, outs[i], {rows, jobs[i].w.rows});
    return outs;
  }

  // The profile's name for a product (NANSCOPE_PROFILE=1): generate's step, kind by kind.
  static const char* linear_kind(const std::string& module) {
    if (module.ends_with("q_proj") || module.ends_with("qkv_proj")) return "linear.qkv";
    if (module.ends_with("o_proj")) return "linear.o";
    if (module.ends_with("lm_head")) return "linear.lm_head";
    return "linear";
  }

  const LoraBranch* lora_for(const std::string& module) const {
    return ov_ ? ov_->lora(module) : nullptr;
  }

  // Every LoRA module of the adapter must be one this pass applies: a module it would skip
  // (an expert, a router) would give the bare model's numbers under the adapter's name.
  void check_adapter_modules() const {
    std::set<std::string> applied = {spec_.embed, spec_.lm_head};
    for (const LayerSpec& s : spec_.layers) {
      const LayerNames& n = s.names;
      for (const std::string* m : {&n.q_proj, &n.k_proj, &n.v_proj, &n.qkv_proj, &n.o_proj})
        if (!m->empty()) applied.insert(*m);
      if (!s.mlp.moe)
        for (const std::string* m : {&n.gate_proj, &n.up_proj, &n.gate_up_proj, &n.down_proj})
          if (!m->empty()) applied.insert(*m);
    }
    const std::string file = (ov_->adapter().dir() / "adapter_model.safetensors").string();
    for (const auto& [module, b] : ov_->plan().lora) {
      if (!ov_->lora(module)) continue;  // not targeted by the config: peft leaves it out
      if (!applied.contains(module))
        fail(
            "{}: module {} has a LoRA that the unmerged forward pass does not apply to this "
            "architecture (experts and routers are not); merge it with `nanscope merge` and run "
            "the merged model",
            file, module);
      if (module == spec_.embed && spec_.embed_scale)
        fail(
            "{}: a LoRA on the embedding of a family that scales its embeddings (Gemma) is not "
            "applied unmerged by nanscope; merge it with `nanscope merge`",
            file);
    }
  }

  // Trainable token rows, then the embedding's LoRA, on the looked-up rows h [T, H].
  void adapt_embeddings(const WeightView& w, std::span<const int64_t> ids, Vec& h) {
    const std::string wname = spec_.embed + ".weight";
    if (const TokenRows* tr = ov_->token_rows(wname)) {
      const TensorRef vals = *ov_->token_values(wname);
      const WeightView vw{vals.bytes().data(), vals.info->dtype, vals.info->shape[0],
                          vals.info->shape[1]};
      std::map<int64_t, int64_t> at;  // token id -> row of the trained values
      for (size_t i = 0; i < tr->rows.size(); ++i) at[tr->rows[i]] = int64_t(i);
      for (int64_t t = 0; t < T_; ++t)
        if (const auto it = at.find(ids[size_t(t)]); it != at.end())
          weight_rows(vw, it->second, 1, dt_, h.data() + t * H_);
    }
    if (const LoraBranch* b = lora_for(spec_.embed))
      apply_lora_embedding(*ov_, *b, w, ids, dt_, h.data());
  }

  Vec norm(int64_t l, const std::string& module, const Vec& x, const Vec& w, int64_t n,
           int64_t rows, std::initializer_list<int64_t> shape = {}) {
    Vec out(x.size());
    {
      const profile::Scope t("rmsnorm");
      rmsnorm(x.data(), rows, n, w.data(), spec_.eps, dt_, out.data(),
              spec_.norm == NormKind::RmsOffset);
    }
    if (shape.size() == 0)
      site(l, module, out, {T_, n});
    else
      site(l, module, out, shape);
    return out;
  }

  // Tables cover the positions after the cache too; a length-dependent RoPE follows the whole
  // length so far, as transformers' dynamic/longrope update does at each step.
  std::pair<int, int64_t> rope_key_for(int rope, int64_t len) const {
    return {rope, P_ + (rope_depends_on_length(spec_.ropes[size_t(rope)]) ? len : maxT_)};
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
  const ModelSpec spec_;
  DType dt_;
  AttentionProfile att_;
  Observer* obs_;
  const AdapterOverlay* ov_;
  bool sites_;  // report sites: an observer that wants them and a single sequence
  WeightSource weights_;
  KvCache* cache_;
  bool last_logits_;  // lm_head on the last row only (generate's logits_to_keep = 1)
  int64_t P_ = 0;     // positions in the cache before these tokens
  std::vector<Segment> segs_;
  int64_t T_ = 0, maxT_ = 0;  // all rows; the longest sequence
  int64_t H_ = 0;
  std::map<std::pair<int, int64_t>, RopeTables> rope_;  // by (rope, length) (see the constructor)
};

template <typename Embed>
ForwardResult run_model(const Checkpoint& ck, std::span<const int64_t> lengths,
                        const ForwardOptions& opt, Observer* obs, Embed&& embed,
                        KvCache* cache = nullptr, std::span<const int64_t> gpu_ids = {}) {
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
  Model m(ck, opt, obs, lengths, cache, cache != nullptr);
  uint64_t device_bytes = 0;
  try {
    if (opt.device == Device::Cuda) {  // the layers on the GPU (src/cuda), the embeddings here
      // (or there, gathered from gpu_ids)
      const Vec h = gpu_ids.empty() ? embed(m) : Vec{};
      CudaPass p = forward_cuda(ck, m.spec(), lengths, h, opt, obs, m.reports_sites(), gpu_ids);
      res.logits = std::move(p.logits);
      res.stopped_early = p.stopped_early;
      device_bytes = p.weight_bytes;
    } else {
      const Vec logits = m.run(embed(m));
      res.logits.assign(logits.begin(), logits.end());
    }
  } catch (const StopForward&) {
    res.stopped_early = true;
  }
  res.weight_bytes = m.weight_bytes() + device_bytes;
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

ForwardResult forward_step(const Checkpoint& ck, std::span<const int64_t> ids, KvCache& cache,
                           const ForwardOptions& opt, Observer* obs) {
  const int64_t T = int64_t(ids.size());
  if (opt.device == Device::Cuda) {
    // The GPU holds the embedding table too: a step sets up no Model here (the spec, the
    // embedding row read from the mapping and its pages released cost host time at every step).
    if (obs)
      fail("forward: a --device cuda step with a key/value cache reports no sites or states");
    if (T <= 0) fail("forward: no input tokens");
    ForwardResult r;
    r.tokens = T;
    r.hidden = ck.config().hidden_size;
    r.vocab = ck.config().vocab_size;
    check_token_ids(ids, r.vocab);
    CudaStep s = forward_cuda_step(ck, ids, cache, opt);
    r.logits = std::move(s.logits);
    r.argmax = s.argmax;
    r.logits_finite = s.finite;
    r.weight_bytes = s.weight_bytes;
    cache.past += T;
    return r;
  }
  ForwardResult r = run_model(
      ck, std::span<const int64_t>(&T, 1), opt, obs, [&](Model& m) { return m.embed(ids); },
      &cache);
  if (!r.stopped_early) cache.past += T;
  return r;
}

ForwardResult forward_embeddings(const Checkpoint& ck, std::span<const float> embeddings, int64_t T,
                                 const ForwardOptions& opt, Observer* obs) {
  return run_model(ck, std::span<const int64_t>(&T, 1), opt, obs, [&](Model&) {
    return rounded_embeddings(embeddings, T, ck.config().hidden_size, opt.dtype);
  });
}

std::vector<float> embed_ids(const Checkpoint& ck, std::span<const int64_t> ids,
                             const ForwardOptions& opt) {
  const int64_t T = int64_t(ids.size());
  Model m(ck, opt, nullptr, std::span<const int64_t>(&T, 1));
  const Vec h = m.embed(ids);
  return std::vector<float>(h.begin(), h.end());
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

ForwardResult forward_batch_ids(const Checkpoint& ck, std::span<const int64_t> ids,
                                std::span<const int64_t> lengths, const ForwardOptions& opt,
                                Observer* obs) {
  int64_t T = 0;
  for (int64_t len : lengths) T += len;
  if (int64_t(ids.size()) != T)
    fail("forward: {} token ids for sequences of {} tokens in all", ids.size(), T);
  const bool gpu =
      opt.device == Device::Cuda && cuda_gathers_embeddings(model_spec(ck.config()), opt);
  if (gpu) check_token_ids(ids, ck.config().vocab_size);  // else Model::embed checks them
  return run_model(
      ck, lengths, opt, obs, [&](Model& m) { return m.embed(ids); }, nullptr,
      gpu ? ids : std::span<const int64_t>{});
}

}  // namespace nanscope
