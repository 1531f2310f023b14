// nanscope merge: a PEFT LoRA adapter merged into a base checkpoint as peft 0.21's
// merge_and_unload() does it, with every update computed in fp32 and rounded into the output
// dtype where peft rounds it (once for linear layers, before and after the add for embeddings),
// streamed tensor by tensor (memory does not grow with the model), written atomically, and
// refused when the result would hold NaN/inf.
//
// API for the CLI (`nanscope merge --base B --adapter A --out O [--dtype ...] [--json]`):
//
//   MergeOptions o; o.base = B; o.adapter = A; o.out = O;   // o.dtype: nullopt = auto
//   o.cancel = &merge_interrupt_flag();                      // set from a SIGINT handler
//   MergeResult r = merge(o);          // throws InputError (exit 2) / OutputError (exit 2)
//   if (json) print(merge_result_json(r).dump(2)) else print(merge_summary(r));
//   return r.refused ? 1 : 0;          // refused: non-finite result, nothing written
//
// What is mirrored from peft, and where it is not, is written down in docs/merge.md.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "numerics/dtype.hpp"

namespace nanscope {

// A LoRA on lm_head or embed_tokens of a model with tied embeddings (one shared tensor).
enum class TiedMode {
  // Default. The merged model computes what base + adapter computed before merging: the
  // embedding and the output projection get their own updates, both tensors are written and
  // config.json says tie_word_embeddings: false.
  Untie,
  // Byte-for-byte what peft 0.21 + transformers 5.17 produce: the update lands in the shared
  // tensor (so a LoRA on lm_head also changes the input embedding, and vice versa), the model
  // stays tied. Kept for comparison with peft; it changes the function of the model.
  Peft,
};

struct MergeOptions {
  std::filesystem::path base;     // Hugging Face checkpoint directory
  std::filesystem::path adapter;  // PEFT adapter directory
  std::filesystem::path out;      // must not exist, or be an empty directory
  std::optional<DType> dtype;     // BF16 | F16 | F32; nullopt = the base's storage dtype
  bool allow_nonfinite = false;   // write even when merged weights hold NaN/inf
  uint64_t max_shard_size = 0;    // bytes; 0 = shard exactly like the base
  int threads = 0;                // 0 = hardware concurrency
  // Every output file and the directory fsynced before the final rename (and the parent after):
  // the merged model survives a power cut whole or not at all. false (--no-fsync): written
  // through the page cache and left to the kernel's writeback, as cp does (faster where the disk
  // is the limit, and the next command reads the model from memory); a killed process still
  // leaves nothing or the whole model.
  bool durable = true;
  TiedMode tied = TiedMode::Untie;
  // peft adds an EMBEDDING's update after rounding it to the weight's dtype (two roundings:
  // lora/layer.py Embedding.merge `get_delta_weight(...).to(orig_dtype)`), a linear layer's in
  // fp32 (one). On (default): bit-identical to peft for embeddings too. Off: one rounding
  // (round(W + dW), never farther from the fp32 result than peft, but other bytes than peft's).
  bool peft_embedding_rounding = true;
  const std::atomic<bool>* cancel = nullptr;  // checked between tensors and blocks
  // Progress (tensor name, index, count); called from the merging thread.
  std::function<void(const std::string&, size_t, size_t)> progress;
};

// A flag a SIGINT handler may set (std::atomic<bool> is lock-free: async-signal-safe to store).
std::atomic<bool>& merge_interrupt_flag();

// With D = round(W+dW) - W (what the written model changed) and dW the exact fp32 update:
//   kept      = ||D|| / ||dW||          (interface.md; 1.0 in fp32). Rounding noise ADDS energy,
//               so with a coarse dtype and a large update it can exceed 1: read it with
//   projected = <D, dW> / ||dW||^2      the share of the update, in its own direction, that the
//               written weights carry (lost elements pull it below 1), and
//   relative_error = ||D - dW|| / ||dW||  how far the written update is from the exact one.
struct TensorFidelity {
  std::string tensor;
  double kept = 1.0;  // ||round(W+dW) - W|| / ||dW|| for this tensor
  double projected = 1.0;
  double relative_error = 0.0;
  uint64_t lost = 0;             // elements with dW != 0 and round(W+dW) == W
  uint64_t update_elements = 0;  // elements with dW != 0
  uint64_t elements = 0;
};

struct NonfiniteTensor {
  std::string tensor;                        // output tensor name
  uint64_t count = 0;                        // NaN/inf elements in the merged tensor
  std::string cause;                         // "adapter" | "arithmetic" | "base"
  std::vector<std::string> adapter_tensors;  // with cause "adapter": its non-finite tensors
  std::string detail;
  std::string fix;  // what to do: the dtype to merge into, or the tensors to look at
};

struct MergeResult {
  bool written = false;  // the output directory exists and is complete
  bool refused = false;  // non-finite result without allow_nonfinite: nothing written
  int merged = 0;        // tensors that received a LoRA / DoRA / lora_bias update
  int replaced = 0;      // tensors replaced by adapter values (modules_to_save, bias, tokens)
  int copied = 0;        // tensors copied from the base unchanged (up to the dtype)
  DType out_dtype = DType::BF16;
  DType base_dtype = DType::BF16;
  // Fidelity over all merged tensors.
  double kept = 1.0;
  double projected = 1.0;
  double relative_error = 0.0;
  uint64_t lost = 0;
  uint64_t update_elements = 0;
  std::vector<TensorFidelity> worst;  // merged tensors with the largest relative_error (<= 5)
  // The figures in words: "update kept exactly", "update kept within bf16 rounding" (relative
  // error at most the dtype's unit roundoff), "update kept (projected P), with bf16 rounding
  // noise of X% of its size on top ..." (|1 - projected| <= 1%), or "Y% of the update lost to
  // rounding into bf16 (...): merge into fp32 (--dtype fp32) or apply the adapter unmerged"
  // (Y = 100 x (1 - projected)).
  std::string fidelity_verdict;
  std::vector<NonfiniteTensor> nonfinite;
  std::vector<std::string> fixes;  // the distinct fixes of `nonfinite`, in order
  bool base_tied = false;
  bool untied = false;               // the merge wrote lm_head separately (TiedMode::Untie)
  bool tie_word_embeddings = false;  // as written to config.json
  std::filesystem::path out;
  std::vector<std::string> shards;      // file names, in order
  std::vector<std::string> side_files;  // copied from the base
  std::vector<std::string> warnings;
  uint64_t bytes_written = 0;
  double seconds = 0;
};

// Throws InputError (unusable base/adapter/out), OutputError (write failed). Interrupted through
// `cancel`: throws InputError("interrupted"); the temporary directory is removed either way.
MergeResult merge(const MergeOptions& options);

// The JSON document of `nanscope merge --json` (interface.md): merged, replaced, copied,
// out_dtype, fidelity {kept, projected, relative_error, lost_elements, update_elements, worst[]},
// plus refused, written, out, shards, nonfinite[], tie_word_embeddings, untied, side_files,
// warnings, seconds.
nlohmann::json merge_result_json(const MergeResult& r);

// A few lines for a human: what was written or why it was refused.
std::string merge_summary(const MergeResult& r);

// "bf16" / "fp16" / "fp32" (the CLI spelling) from a DType, and back (nullopt for "auto").
std::string dtype_cli_name(DType t);
std::optional<DType> parse_merge_dtype(const std::string& s);  // throws InputError if unknown

}  // namespace nanscope
