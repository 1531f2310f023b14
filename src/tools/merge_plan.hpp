// What a merge will write, decided before any arithmetic: the adapter's tensors sorted by what
// they do (and checked against the base), which base tensor each update lands in (tie / untie
// of embed_tokens and lm_head), and the shard layout of the output.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "formats/adapter.hpp"
#include "formats/adapter_plan.hpp"
#include "formats/checkpoint.hpp"
#include "tools/merge.hpp"

namespace nanscope {

// ---- the output --------------------------------------------------------------------------------

struct OutTensor {
  std::string name;
  TensorRef source;                     // base tensor the values start from
  const TensorInfo* replace = nullptr;  // adapter tensor loaded over the base values
  std::vector<const LoraModule*> lora;  // weight updates, in peft's merge order
  const LoraModule* bias_of = nullptr;  // lora_bias: lora_B.bias added to this bias
  const TokenRows* rows = nullptr;
  DType dtype;  // output dtype of this tensor
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
  bool touched() const { return replace || !lora.empty() || bias_of || rows; }
};

struct Shard {
  std::string file;
  std::vector<size_t> tensors;  // indices into MergePlan::tensors
};

struct MergePlan {
  AdapterPlan adapter;             // OutTensor points into it (std::map nodes do not move)
  std::vector<OutTensor> tensors;  // the base's, in its shard and file order (+ an untied lm_head)
  std::vector<Shard> shards;
  bool base_tied = false;
  bool untied = false;               // lm_head written as its own tensor (TiedMode::Untie)
  bool tie_word_embeddings = false;  // as config.json will say
  std::vector<std::string> warnings;
};

// Everything above for merging `ad` into `base` with output dtype `out` (options: tied mode,
// max_shard_size). Throws InputError.
MergePlan plan_merge(const MergeOptions& o, const Checkpoint& base, const Adapter& ad, DType out);

}  // namespace nanscope
