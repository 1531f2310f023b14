// Architectures as data. Each supported model_type is one entry of a table (arch.cpp) saying
// which pieces it has; model_spec() derives from it and config.json, once, the description of
// every layer (norms and where they sit, attention kind, window, RoPE, MLP or experts) and the
// Hugging Face name of every weight. scan's expected tensors, the forward pass and the tests'
// site lists all read that description; nothing downstream re-derives a flag from model_type.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "formats/hf_config.hpp"

namespace nanscope {

enum class NormKind {
  Rms,        // Llama/Qwen/Phi: y = round(x * rsqrt(mean(x^2) + eps)); out = round(w * y)
  RmsOffset,  // Gemma: out = round(x * rsqrt(mean(x^2) + eps) * (1 + w)), fp32 throughout
};
enum class Activation { Silu, GeluTanh };
// How the sliding window of each layer follows from config.json.
enum class WindowRule {
  None,
  AllLayers,      // Mistral, Mixtral, Phi-3, Qwen3-MoE: every layer when sliding_window is set
  LayerTypes,     // Gemma 2/3: layer_types (or the family's default pattern)
  QwenMaxWindow,  // Qwen2/Qwen3/Qwen2-MoE: use_sliding_window, layers >= max_window_layers
};
// How a mixture-of-experts block names its tensors.
enum class ExpertNames {
  None,
  Qwen,     // mlp.gate (router), mlp.experts.E.{gate,up,down}_proj
  Mixtral,  // block_sparse_moe.gate, block_sparse_moe.experts.E.{w1,w3,w2}
};

struct Architecture {
  std::string_view model_type;
  NormKind norm = NormKind::Rms;
  bool qk_norm = false;                     // per-head RMSNorm on q and k before RoPE
  bool qkv_bias_always = false;             // Qwen2: q/k/v biases regardless of config
  bool attention_bias_from_config = false;  // `attention_bias` adds q/k/v/o biases
  bool mlp_bias_from_config = false;        // Llama: `mlp_bias` adds gate/up/down biases
  bool sandwich_norms = false;              // Gemma 2/3: norms after attention and MLP outputs too
  bool fused_qkv = false;                   // Phi-3: one qkv_proj, q/k/v as row ranges
  bool fused_gate_up = false;               // Phi-3: one gate_up_proj, gate then up rows
  bool embed_scale = false;       // Gemma: embeddings times sqrt(hidden_size) in the run dtype
  bool partial_rotary = false;    // honours partial_rotary_factor (Phi-3 family)
  bool attention_scalar = false;  // Gemma: scaling = query_pre_attn_scalar^-0.5
  WindowRule window = WindowRule::None;
  ExpertNames experts = ExpertNames::None;
  bool shared_expert = false;           // Qwen2-MoE: a dense expert with a sigmoid gate
  bool router_weights_in_dtype = true;  // Qwen: top-k weights cast to the run dtype; Mixtral: fp32
  bool router_renormalise = false;      // Mixtral: top-k weights always sum to 1
};

// Throws InputError naming the file (`what`, e.g. "DIR/config.json"), the model_type and the
// supported ones.
const Architecture& find_architecture(std::string_view model_type,
                                      std::string_view what = "config.json");
std::vector<std::string_view> supported_architectures();

struct AttentionSpec {
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  float scaling = 1.0f;          // multiplies q.k^T
  std::optional<float> softcap;  // scores = cap * tanh(scores / cap) (eager only, as in HF)
  int64_t window = 0;            // 0: causal; else keys j with i - window < j <= i
  int rope = 0;                  // index into ModelSpec::ropes
  int64_t rotary_dim = 0;        // head_dim, or fewer with partial_rotary_factor
  bool qk_norm = false, qkv_bias = false, o_bias = false, fused_qkv = false;
};

struct MlpSpec {
  bool moe = false;
  int64_t intermediate = 0;  // dense width (MoE: each expert's width)
  Activation act = Activation::Silu;
  bool bias = false, fused_gate_up = false;
  int64_t experts = 0, top_k = 0, shared_intermediate = 0;
  bool norm_topk = false, router_in_dtype = true;
};

// Module paths (no ".weight") of one layer's weights; empty where the layer has none.
struct LayerNames {
  std::string prefix;  // "model.layers.3."
  std::string input_norm, q_proj, k_proj, v_proj, qkv_proj, o_proj, q_norm, k_norm;
  std::string attn_out_norm;  // Gemma: post_attention_layernorm on the attention output
  std::string mlp_in_norm;    // Llama: post_attention_layernorm; Gemma: pre_feedforward_layernorm
  std::string mlp_out_norm;   // Gemma: post_feedforward_layernorm
  std::string gate_proj, up_proj, down_proj, gate_up_proj;
  std::string router, shared_gate_proj, shared_up_proj, shared_down_proj, shared_expert_gate;
  std::string expert_prefix;                        // "model.layers.3.mlp.experts."
  std::string expert_gate, expert_up, expert_down;  // leaf names: "gate_proj" / "w1", ...
  std::string expert(int64_t e, const std::string& leaf) const {
    return expert_prefix + std::to_string(e) + "." + leaf;
  }
  // The dense MLP's modules as sites and adapters name them (a fused gate_up_proj has no own
  // gate/up: these are its halves' site names).
  std::string gate() const { return gate_proj.empty() ? prefix + "mlp.gate_proj" : gate_proj; }
  std::string up() const { return up_proj.empty() ? prefix + "mlp.up_proj" : up_proj; }
  std::string down() const { return down_proj.empty() ? prefix + "mlp.down_proj" : down_proj; }
};

struct LayerSpec {
  int64_t index = 0;
  AttentionSpec attn;
  MlpSpec mlp;
  LayerNames names;
};

struct ModelSpec {
  const Architecture* arch = nullptr;
  int64_t hidden = 0, vocab = 0;
  NormKind norm = NormKind::Rms;
  double eps = 1e-6;
  bool embed_scale = false;
  std::optional<float> final_softcap;
  bool tied = false;
  std::string embed = "model.embed_tokens", final_norm = "model.norm", lm_head = "lm_head";
  // Tensors of a multimodal checkpoint that the text forward pass does not read (its vision
  // tower): scan accepts them without expecting them.
  std::vector<std::string> foreign_prefixes;
  std::vector<RopeConfig> ropes;  // [0] for most families; Gemma 3: full, then sliding layers
  std::vector<LayerSpec> layers;
};

// Gemma's embedding scale, in place on n values (a no-op elsewhere): x = round(x * round(sqrt(H))),
// the float32 scalar cast to the run dtype first (Gemma2TextScaledWordEmbedding).
void scale_embeddings(const ModelSpec& m, float* x, size_t n, DType dt);

// The description of a checkpoint from its config. Throws InputError naming config.json's key
// and value for anything the engine does not compute (an activation, bidirectional attention).
ModelSpec model_spec(const ModelConfig& c);

struct ExpectedTensor {
  std::string name;
  std::vector<int64_t> shape;
  bool required = true;
};

// Every tensor a checkpoint of this config should hold (lm_head only when untied).
std::vector<ExpectedTensor> expected_tensors(const ModelSpec& s);
std::vector<ExpectedTensor> expected_tensors(const ModelConfig& c);

}  // namespace nanscope
