// `nanscope generate`: decoding with a key/value cache, token for token what transformers'
// generate(do_sample=False) gives in that dtype (greedy), or sampled (temperature / top-k /
// top-p, with nanscope's own random numbers: not bit-compatible with torch's). Stops at the
// eos ids of generation_config.json (else config.json). A step whose logits are not all finite
// ends the run and names the first non-finite site (the "!!!!" of engines that sample token 0
// from NaN logits).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "formats/checkpoint.hpp"
#include "model/adapter_overlay.hpp"
#include "model/forward.hpp"

namespace nanscope {

struct GenerateOptions {
  std::vector<int64_t> prompt;
  int64_t max_new_tokens = 32;
  DType dtype = DType::BF16;
  AttentionProfile attention = AttentionProfile::Eager;
  std::shared_ptr<const AdapterOverlay> adapter;  // applied unmerged; null: the bare model
  // Sampling: temperature 0 is greedy (argmax, the first index among equal logits, as torch).
  double temperature = 0.0;
  int64_t top_k = 0;    // 0: all tokens
  double top_p = 1.0;   // nucleus: the smallest set whose probability reaches top_p
  uint64_t seed = 0;
  std::optional<std::vector<int64_t>> eos;  // instead of generation_config.json's
  // Copy the weights once into memory of their own (2 MiB pages) and decode from there, or
  // read them from the mapped files at every step (no second copy in memory, slower).
  bool resident = true;
  bool keep_logits = false;  // GenerateResult::step_logits (tests: how close a near-tie was)
  // Cuda: the layers and the key/value cache on the GPU (src/cuda/forward_cuda.hpp); only each
  // step's logits row comes back. No adapter there yet.
  Device device = Device::Cpu;
};

struct GenerateStep {
  int64_t step = 0, layer = -1;
  std::string site;
};

struct GenerateResult {
  std::vector<int64_t> prompt_ids, ids;  // ids: the new tokens
  std::optional<std::string> text;       // the new tokens decoded (when a tokenizer is there)
  std::string finish_reason;             // "length" | "eos" | "nonfinite"
  std::optional<GenerateStep> first_nonfinite;
  std::vector<std::string> notes;  // generation_config settings honoured or ignored
  double prefill_s = 0, decode_s = 0;
  std::vector<std::vector<float>> step_logits;  // with keep_logits: the logits of each step
  bool finite() const { return !first_nonfinite; }
};

// The eos ids of a checkpoint: generation_config.json's eos_token_id (an int or a list), else
// config.json's; empty when neither names one.
std::vector<int64_t> eos_ids(const Checkpoint& ck);

// Throws InputError on bad input (ids out of range, no prompt, bad sampling values).
GenerateResult generate(const Checkpoint& ck, const GenerateOptions& opt);

// {"prompt_ids", "ids", "text", "finish_reason", "first_nonfinite": null | {"step", "layer",
// "site"}, "notes", "prefill_s", "decode_s", "tokens_per_s"}
nlohmann::json generate_json(const GenerateResult& r);
std::string generate_text(const GenerateResult& r);

}  // namespace nanscope
