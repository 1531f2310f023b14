// The grammar of PEFT tensor names: what each key of an adapter_model.safetensors (or a
// PEFT-wrapped key left in a saved model) stands for. One parser for merge, scan and check, so
// that the three cannot disagree on what a key means.
//
//   key     := ["base_model.model."] module "." role          (peft's save_pretrained)
//   role    := "lora_A" [".ADAPTER"] ".weight"                 LoraA       [r, in]
//            | "lora_B" [".ADAPTER"] ".weight"                 LoraB       [out, r]
//            | "lora_B" [".ADAPTER"] ".bias"                   LoraBias    [out] (lora_bias)
//            | "lora_embedding_A" [".ADAPTER"]                 EmbeddingA  [r, V]
//            | "lora_embedding_B" [".ADAPTER"]                 EmbeddingB  [H, r]
//            | "lora_magnitude_vector" [".ADAPTER" [".weight"]] Magnitude  DoRA, [out] | [H]
//            | "token_adapter.trainable_tokens_delta" [".ADAPTER"]  TokenRows [n, H]
//   otherwise a whole tensor (Saved): modules_to_save (`lm_head.weight`), biases of bias=all /
//   lora_only (`q_proj.base_layer.bias`, `k_proj.bias`), an embedding's base layer
//   (`embed_tokens.base_layer.weight`); the wrapper infixes `.base_layer.`, `.original_module.`
//   and `.modules_to_save.[default.]` are removed to get the base tensor's name.
// save_pretrained removes the adapter name (ADAPTER, "default"); an in-memory state dict (or a
// model saved without merge_and_unload) keeps it.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace nanscope {

inline constexpr std::string_view kPeftPrefix = "base_model.model.";

enum class PeftRole {
  LoraA,
  LoraB,
  LoraBias,
  EmbeddingA,
  EmbeddingB,
  Magnitude,
  TokenRows,
  Saved,  // a whole tensor loaded over the base's (modules_to_save, bias, embedding base layer)
};

// "lora_A", "lora_embedding_B", ..., "saved": for messages and tests.
std::string_view peft_role_name(PeftRole r);

struct PeftName {
  PeftRole role = PeftRole::Saved;
  bool prefixed = false;  // started with base_model.model.
  // The module path in the transformers model, without the prefix:
  // "model.layers.0.self_attn.q_proj" (Saved: the module of `target`, e.g. "lm_head").
  std::string module;
  // The base tensor the key updates or replaces: module + ".weight" for the LoRA roles,
  // DoRA and token rows, module + ".bias" for LoraBias; for Saved the key without the prefix
  // and the wrapper infixes ("model.embed_tokens.weight").
  std::string target;
  std::string adapter;   // an adapter name left in the key ("default"); empty as peft saves
  bool wrapped = false;  // Saved only: the key held a wrapper infix (base_layer, ...)
  bool is_lora() const { return role != PeftRole::Saved; }
  bool is_embedding() const { return role == PeftRole::EmbeddingA || role == PeftRole::EmbeddingB; }
};

// Parses one key. nullopt: a LoRA tensor of no known form (a `lora_*` segment that is not a
// role above, or a role followed by something else, like `lora_A.weight.extra`).
std::optional<PeftName> parse_peft_name(std::string_view key);

// Whether a tensor name in a MODEL checkpoint is a PEFT key transformers will not load: it
// carries the prefix, a LoRA role, or a wrapper infix.
bool is_peft_key(std::string_view key);

}  // namespace nanscope
