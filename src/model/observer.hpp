// What the forward pass reports while it runs: every intermediate ("site") and every hidden
// state, the way ggml's eval-callback sees every named node of the graph.
//
// Sites, in the order they are computed (L = layer index, names as in docs/interface.md):
//   model.embed_tokens                           [T, H]
//   model.layers.L.input_layernorm               [T, H]
//   model.layers.L.self_attn.q_proj              [T, nH*D]
//   model.layers.L.self_attn.k_proj              [T, nKV*D]
//   model.layers.L.self_attn.v_proj              [T, nKV*D]
//   model.layers.L.self_attn.q_norm              [T, nH, D]     (Qwen3 only)
//   model.layers.L.self_attn.k_norm              [T, nKV, D]    (Qwen3 only)
//   model.layers.L.self_attn.rope                [T, nH+nKV, D] q heads then k heads, after RoPE
//   model.layers.L.self_attn.scores              [nH, T, T]     q.k^T scaled and masked
//   model.layers.L.self_attn.probs               [nH, T, T]     softmax
//   model.layers.L.self_attn.context             [T, nH*D]      probs.v
//   model.layers.L.self_attn.o_proj              [T, H]
//   model.layers.L.residual_attn                 [T, H]
//   model.layers.L.post_attention_layernorm      [T, H]
//   model.layers.L.mlp.gate_proj                 [T, I]
//   model.layers.L.mlp.up_proj                   [T, I]
//   model.layers.L.mlp.act                       [T, I]         silu(gate) * up
//   model.layers.L.mlp.down_proj                 [T, H]
//   model.layers.L.residual_mlp                  [T, H]
//   model.norm                                   [T, H]
//   lm_head                                      [T, V]
// Values are fp32, already rounded to the run dtype, except the fused profile's scores and
// probs, which are fp32 as the fused kernels keep them (masked scores there are -inf).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

namespace nanscope {

// How a hidden state is reduced per sequence (`hidden --pool`): the state [T, H] itself, its last
// row, or h.float().mean(dim=1) (an fp32 sum over the positions in order, divided by T).
enum class Pool { None, Last, Mean };

struct SiteView {
  int64_t layer = -1;     // -1 for model.embed_tokens, model.norm, lm_head
  std::string_view name;  // full site name, "model.layers.3.self_attn.scores"
  std::span<const float> values;
  std::span<const int64_t> shape;
  // Whether the site computed something non-finite. For scores, masked positions may hold
  // -inf (fp16's finfo.min + a negative score rounds to -inf) without harm: only NaN or +inf
  // there counts. Every other site: any non-finite element.
  bool finite = true;
  // Largest |value| among the site's finite intermediate results before rounding to the run
  // dtype, masked positions excluded: for eager scores this includes the unscaled q.k^T, the
  // value that overflows fp16. In an fp32 run, this is the number to compare with 65504.
  double peak_abs = 0;
};

class Observer {
 public:
  virtual ~Observer() = default;
  virtual void site(const SiteView&) {}
  // Hidden state `index` (0..N) as transformers' output_hidden_states: [0] the embeddings,
  // [i] the output of layer i-1 for i < N, [N] after the final norm. values is [T, H].
  virtual void hidden_state(int64_t index, std::span<const float> values, int64_t T, int64_t H) {
    (void)index, (void)values, (void)T, (void)H;
  }
  // Whether state `index` is wanted at all: a backend whose states live elsewhere (the GPU)
  // brings back only those.
  virtual bool wants_state(int64_t index) const {
    (void)index;
    return true;
  }
  // The reductions wanted per sequence (none: the whole state). A backend that can reduce where
  // the states are (the GPU) calls hidden_state_pooled for each of them, in this order, instead
  // of hidden_state; the CPU backend calls hidden_state and the observer reduces.
  virtual std::span<const Pool> pools() const { return {}; }
  // rows [sequences, H]: the reduction `pool` of state `index` of each sequence of the pass;
  // state_finite[s]: whether every element of sequence s's whole state is finite.
  virtual void hidden_state_pooled(int64_t index, Pool pool, std::span<const float> rows,
                                   std::span<const uint8_t> state_finite, int64_t H) {
    (void)index, (void)pool, (void)rows, (void)state_finite, (void)H;
  }
  // Checked after every site: returning true ends the forward pass early (the fp32 shadow
  // pass stops once it has seen the site it is looking for).
  virtual bool done() const { return false; }
  // False for observers of hidden states only: the pass then skips building the sites (for
  // attention, scores and probabilities of [heads, T, T] floats: 4 GB at T = 5792 with 32 heads).
  virtual bool wants_sites() const { return true; }
};

}  // namespace nanscope
