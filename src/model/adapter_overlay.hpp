// A PEFT adapter applied the way peft's PeftModel computes it, unmerged (peft/tuners/lora/
// layer.py Linear.forward / Embedding.forward, variants.py DoRA): the base weights stay as the
// run dtype reads them; each targeted module's output gets its LoRA branch, computed in the
// adapter's fp32 (PeftModel.from_pretrained upcasts bf16/fp16 adapters, autocast_adapter_dtype)
// and added to the base output in fp32, then rounded once to the run dtype:
//   y = round(float(base(x)) + fl(B @ (A @ x) (+ lora_bias)) * scale)
// DoRA (linear):  y = round(base + ((m - 1) * (base - bias) + m * fl(B @ A @ x) * scale)),
//                 m = magnitude / ||W + scale * B @ A||_row, W in the run dtype;
// embeddings: rows of lora_embedding_A, times lora_embedding_B^T, the same add (DoRA: m * base +
// m * lora * scale, norms over the vocabulary). modules_to_save and bias="all" tensors replace
// the base's (rounded to the run dtype, as loading them into the model does); trainable tokens
// replace rows of the embedding.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "formats/adapter.hpp"
#include "formats/adapter_plan.hpp"
#include "formats/checkpoint.hpp"
#include "numerics/dtype.hpp"
#include "numerics/kernels.hpp"

namespace nanscope {

struct LoraBranch {
  std::string module;  // "model.layers.0.self_attn.q_proj"
  bool embedding = false;
  int64_t r = 0, in = 0, out = 0;  // linear: A [r, in], B [out, r]; embedding: A [r, V], B [H, r]
  float scale = 1.0f;
  std::vector<float> A, B;
  std::vector<float> bias;       // lora_B.bias [out] (lora_bias), empty without
  std::vector<float> magnitude;  // DoRA [out] (linear) | [H] (embedding), empty without
};

class AdapterOverlay {
 public:
  // Reads DIR and checks it against `base` (the same checks as merge). Throws InputError for
  // what the unmerged pass does not compute (LoRA on experts, embedding LoRA on a family that
  // scales its embeddings, trainable tokens on tied embeddings), naming the tensor.
  static std::shared_ptr<const AdapterOverlay> open(const std::filesystem::path& dir,
                                                    const Checkpoint& base);

  const Adapter& adapter() const { return ad_; }
  const AdapterPlan& plan() const { return plan_; }
  const LoraBranch* lora(const std::string& module) const;
  // The adapter's tensor that replaces base tensor `name` (modules_to_save, bias "all").
  std::optional<TensorRef> replacement(const std::string& name) const;
  const TokenRows* token_rows(const std::string& name) const;
  std::optional<TensorRef> token_values(const std::string& name) const;
  // DoRA's m per output row (linear) or per hidden column (embedding) for base weight `w` as
  // run dtype `dt` reads it. Computed once per (module, dtype) and kept.
  std::span<const float> dora_scale(const LoraBranch& b, const WeightView& w, DType dt) const;
  size_t modules() const { return lora_.size(); }

 private:
  AdapterOverlay(Adapter ad, AdapterPlan plan) : ad_(std::move(ad)), plan_(std::move(plan)) {}
  Adapter ad_;
  AdapterPlan plan_;  // points into ad_'s file (shared, so the pointers stay valid)
  std::map<std::string, LoraBranch> lora_;
  mutable std::mutex mu_;
  mutable std::map<std::pair<std::string, DType>, std::vector<float>> dora_;
};

// PeftModel's LoRA on a linear output: y[t, j] for rows [row0, row0 + rows) of the module's
// output (a fused qkv_proj / gate_up_proj hands out row ranges), x [T, in] the module input.
// `bias` is the base layer's bias already in y (DoRA subtracts it), nullable.
void apply_lora_linear(const AdapterOverlay& ov, const LoraBranch& b, const WeightView& w_full,
                       const float* x, int64_t T, int64_t row0, int64_t rows, const float* bias,
                       DType dt, float* y);

// PeftModel's LoRA on the embedding output h [T, H] of `ids`.
void apply_lora_embedding(const AdapterOverlay& ov, const LoraBranch& b, const WeightView& w,
                          std::span<const int64_t> ids, DType dt, float* h);

}  // namespace nanscope
