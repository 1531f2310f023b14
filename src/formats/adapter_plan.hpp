// A PEFT adapter's tensors sorted by what each one does (LoRA factors, DoRA magnitudes, full
// tensors loaded over the base, trainable token rows) and checked against the base checkpoint:
// the one reading of an adapter that merge (tools/merge_plan) and the unmerged forward pass
// (model/adapter_overlay) share.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "formats/adapter.hpp"
#include "formats/checkpoint.hpp"

namespace nanscope {

inline constexpr const char* kEmbedWeight = "model.embed_tokens.weight";
inline constexpr const char* kLmHeadWeight = "lm_head.weight";

struct LoraModule {
  std::string module;                // module path in the model: "model.layers.0.self_attn.q_proj"
  const TensorInfo* A = nullptr;     // lora_A.weight [r, in] | lora_embedding_A [r, V]
  const TensorInfo* B = nullptr;     // lora_B.weight [out, r] | lora_embedding_B [H, r]
  const TensorInfo* bias = nullptr;  // lora_B.bias [out] (lora_bias)
  const TensorInfo* magnitude = nullptr;  // DoRA: [out] (linear) | [H] (embedding)
  bool embedding = false;
  LoraScale scale{};
};

struct TokenRows {
  const TensorInfo* values = nullptr;  // [n, H]
  std::vector<int64_t> rows;
};

struct AdapterPlan {
  std::map<std::string, LoraModule> lora;             // by module path
  std::map<std::string, const TensorInfo*> replace;   // base tensor name -> full values
  std::map<std::string, TokenRows> token_rows;        // base tensor name -> rows
  std::map<std::string, uint64_t> adapter_nonfinite;  // adapter tensor -> NaN/inf count
};

// Sorts and checks every tensor of the adapter against the base (shapes, ranks, config).
// base_tied: the base has no lm_head.weight of its own (tied to the embedding). Throws InputError.
AdapterPlan plan_adapter(const Adapter& ad, const Checkpoint& base, bool base_tied);

}  // namespace nanscope
