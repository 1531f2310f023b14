// `nanscope compare A B`: runs two models (or one model two ways) on the same input and says how
// far apart they are, layer by layer: merged vs base + adapter unmerged, fp16 vs fp32, eager vs
// fused, base vs fine-tune. The cost is the two forward passes (and, with --generate, the two
// decodes).
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
#include "tools/generate.hpp"

namespace nanscope {

struct CompareSide {
  const Checkpoint* ck = nullptr;
  std::shared_ptr<const AdapterOverlay> adapter;
  DType dtype = DType::BF16;
  AttentionProfile attention = AttentionProfile::Eager;
  std::string label;            // "MODEL (+ ADAPTER) bf16 eager" (+ " cuda" on the GPU)
  Device device = Device::Cpu;  // --device cuda: this side's passes on the GPU
};

struct StateDiff {
  int64_t index = 0;
  bool finite = true;  // both states finite (else the figures are absent)
  double rel_err = 0, cosine = 0, max_abs_diff = 0;
};

struct CompareResult {
  std::string label_a, label_b;
  int64_t tokens = 0;
  std::vector<StateDiff> states;
  bool finite_a = true, finite_b = true;  // every state and the logits of each run
  bool logits_finite = true;
  double logits_rel_err = 0, kl = 0, top1_agreement = 0;
  double nll_a = 0, nll_b = 0;  // mean next-token NLL of the input (nats); NaN if not finite
  std::optional<GenerateResult> gen_a, gen_b;
  int64_t agree = 0;  // leading new tokens the two greedy continuations share
};

// Per-state figures, shared with check's divergence chart: rel_err = ||a - b|| / ||b||,
// cosine, max |a - b| (over all elements; absent unless both are finite).
StateDiff diff_states(std::span<const float> a, std::span<const float> b);
// Mean next-token negative log-likelihood (nats) of ids[1..] under logits [T, V].
double next_token_nll(std::span<const float> logits, std::span<const int64_t> ids, int64_t V);

// Throws InputError when the two cannot be compared (other widths, depth or vocabulary).
CompareResult compare(const CompareSide& a, const CompareSide& b, std::span<const int64_t> ids,
                      int64_t generate_tokens = 0);

// docs/interface.md: {"a", "b", "states": [{"index", "rel_err", "cosine", "max_abs_diff"}],
// "logits": {"rel_err", "kl", "top1_agreement"}, "nll": {"a", "b"}, "generate": null | {"a",
// "b", "agree"}, "finite": {"a", "b"}}
nlohmann::json compare_json(const CompareResult& r);
std::string compare_text(const CompareResult& r);

}  // namespace nanscope
