// The forward pass (the fast one; model/reference.hpp is its scalar twin) of every supported
// decoder family, computed the way transformers computes it on CPU in a run dtype, rounding
// where it rounds (docs/forward.md), and reporting every intermediate site and hidden state to
// an Observer (model/observer.hpp).
//
// Weights are read from the mapped checkpoint in place, layer by layer, cast to the run dtype
// as transformers casts them at load; each finished layer's pages are handed back, so the peak
// memory is about one layer plus the activations.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "formats/checkpoint.hpp"
#include "model/observer.hpp"
#include "numerics/backend.hpp"
#include "numerics/dtype.hpp"

namespace nanscope {

class AdapterOverlay;
class ResidentWeights;

enum class AttentionProfile {
  Eager,  // transformers' eager_attention_forward: scores and probs rounded to the run dtype
  Fused,  // SDPA / flash / SGLang: scores and softmax in fp32, the output rounded once
};
std::string_view attention_name(AttentionProfile a);  // "eager" | "fused"
// "eager", or "fused" also spelled "sdpa" (the profile of transformers' attn_implementation
// "sdpa"), any case.
std::optional<AttentionProfile> parse_attention(std::string_view s);

struct ForwardOptions {
  DType dtype = DType::BF16;  // F32, BF16 or F16
  AttentionProfile attention = AttentionProfile::Eager;
  bool release_pages = true;  // hand each finished layer's weight pages back to the kernel
  // A PEFT adapter applied unmerged, as PeftModel computes it (model/adapter_overlay.hpp);
  // opened against the same checkpoint. Null: the bare model.
  const AdapterOverlay* adapter = nullptr;
  // Copies of the weights kept across passes (model/weights.hpp); null: read from the mapping.
  ResidentWeights* resident = nullptr;
  Device device = Device::Cpu;  // Cuda: the layers on the GPU (src/cuda/forward_cuda.hpp)
  // forward_step with device Cuda: false brings back only the argmax of the logits row and
  // whether it is finite (ForwardResult::argmax, logits_finite), computed on the GPU.
  bool step_logits = true;
};

struct ForwardResult {
  int64_t tokens = 0, hidden = 0, vocab = 0;
  std::vector<float> logits;   // [tokens, vocab], rounded to the run dtype
  bool stopped_early = false;  // the observer's done() ended the pass (logits then empty)
  // Bytes of weight tensors the pass read: the whole checkpoint for a dense model, only the
  // routed experts' share of a mixture of experts.
  uint64_t weight_bytes = 0;
  // forward_step on the GPU with step_logits = false (logits then empty): the first index of the
  // largest logit and whether every logit is finite.
  int64_t argmax = -1;
  bool logits_finite = true;
};

// Runs the model on token ids. Throws InputError for an id outside [0, vocab_size), a missing
// or misshapen tensor, an unsupported architecture or rope type.
ForwardResult forward(const Checkpoint& ck, std::span<const int64_t> ids, const ForwardOptions& opt,
                      Observer* obs = nullptr);

// Keys (after RoPE) and values of the positions already run, per layer, as transformers'
// DynamicCache holds them: a sliding-window layer keeps its last window - 1 positions only.
struct KvCache {
  int64_t past = 0;                      // positions run so far
  std::vector<std::vector<float>> k, v;  // per layer: [rows, kv_heads * head_dim]
  std::vector<int64_t> start;            // per layer: the position of row 0
  // --device cuda: the keys and values stay on the GPU (src/cuda/forward_cuda.hpp), k/v above
  // stay empty. `capacity`: the positions that GPU cache is sized for (the prompt plus the new
  // tokens; 0: the first step's length plus 4096), allocated once at the first step.
  int64_t capacity = 0;
  std::shared_ptr<void> device;
};

// One step of incremental decoding (transformers' generate): `ids` at positions [cache.past,
// cache.past + ids.size()) attend to the cached positions and to each other; their keys and
// values are appended. The logits are the last position's only ([1, vocab]), as generate
// computes them. Pass options with release_pages = false: the next step reads every page again.
ForwardResult forward_step(const Checkpoint& ck, std::span<const int64_t> ids, KvCache& cache,
                           const ForwardOptions& opt, Observer* obs = nullptr);

// Runs the model on input embeddings [T, hidden_size] instead of ids (soft tokens, as
// transformers' `inputs_embeds`): the values are first rounded to the run dtype. No
// model.embed_tokens site is reported; hidden state 0 is the (rounded) input.
ForwardResult forward_embeddings(const Checkpoint& ck, std::span<const float> embeddings, int64_t T,
                                 const ForwardOptions& opt, Observer* obs = nullptr);

// The input embeddings [T, hidden_size] of ids exactly as forward() computes them: the table's
// rows in the run dtype, with opt.adapter's trainable tokens, embedding LoRA and saved
// embedding (modules_to_save), and Gemma's scale. forward_batch's input for token ids.
std::vector<float> embed_ids(const Checkpoint& ck, std::span<const int64_t> ids,
                             const ForwardOptions& opt);

// Runs several independent sequences in one pass (hidden-state extraction): `embeddings` holds
// their input embeddings one after another, [sum(lengths), H]. Each sequence is computed as
// forward_embeddings computes it alone: positions restart at 0 and attention stays inside it;
// only the linear layers see all rows at once, which is what makes batches fast. The observer
// gets the hidden states of all rows stacked ([sum(lengths), H]) and no sites; its done()
// is asked after each state. Logits are [sum(lengths), vocab].
//
// Rows of a batch may differ from the same sequence run alone in the last bit where a matrix
// kernel picks another accumulation order for another number of rows (as torch's do).
ForwardResult forward_batch(const Checkpoint& ck, std::span<const float> embeddings,
                            std::span<const int64_t> lengths, const ForwardOptions& opt,
                            Observer* obs = nullptr);

// forward_batch of token ids [sum(lengths)], for --device cuda where the GPU gathers the
// embedding rows itself (cuda_gathers_embeddings in cuda/forward_cuda.hpp): the host then
// builds no [T, H] input and copies nothing up but the ids. Elsewhere the rows come from
// embed_ids, as forward_batch's input.
ForwardResult forward_batch_ids(const Checkpoint& ck, std::span<const int64_t> ids,
                                std::span<const int64_t> lengths, const ForwardOptions& opt,
                                Observer* obs = nullptr);

}  // namespace nanscope
