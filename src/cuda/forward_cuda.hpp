// The forward pass on an NVIDIA GPU (`--device cuda`): the decoder layers, final norm and lm_head
// of model/forward.cpp's recipe with kernels for the GPU, numerics as transformers has them there
// (docs/cuda.md): cuBLAS products of bf16/fp16/fp32 inputs with fp32 accumulation, RMSNorm, RoPE,
// eager attention (scores materialised and rounded like transformers' eager) or fused attention
// (flash-style, fp32 softmax), activations and residuals, each rounded where transformers rounds.
//
// The host computes the embeddings (a row gather) and hands them over, or the GPU gathers them
// from token ids where it holds the table (hidden's batches); weights come per layer
// from the same WeightSource as the CPU pass. The observer's statistics (finite, peak) are
// computed on the GPU; values come back to the host only where the observer wants them (sites
// for trace, hidden states).
//
// This header needs no CUDA: without the toolkit (NANSCOPE_CUDA=OFF) forward_cuda.cpp's stub
// throws an InputError saying how to build it.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "formats/checkpoint.hpp"
#include "model/arch.hpp"
#include "model/observer.hpp"
#include "numerics/backend.hpp"
#include "numerics/dtype.hpp"

namespace nanscope {

struct ForwardOptions;
struct KvCache;

struct CudaPass {
  std::vector<float> logits;   // [T, vocab], rounded to the run dtype; empty when stopped early
  bool stopped_early = false;  // the observer's done() ended the pass
  uint64_t weight_bytes = 0;   // bytes of weight tensors read from the checkpoint
};

// Runs layers, final norm and lm_head on GPU 0 from the (rounded) embeddings h [sum(lengths), H]
// of the sequences `lengths` (stacked as in forward_batch). Reports hidden state 0 (h) and the
// rest, and, when `sites` is set (one sequence, an observer that wants them), every site.
// Throws InputError for a family or option the GPU path does not compute yet (mixtures of
// experts), or when no GPU is usable.
// With `ids` (h empty), the embedding rows are gathered on the GPU instead, from the table the
// weights hold there: only where cuda_gathers_embeddings says the GPU has it.
CudaPass forward_cuda(const Checkpoint& ck, const ModelSpec& spec, std::span<const int64_t> lengths,
                      std::span<const float> h, const ForwardOptions& opt, Observer* obs,
                      bool sites, std::span<const int64_t> ids = {});

// Whether forward_cuda can gather a pass's embedding rows on the GPU: no adapter (its embedding
// LoRA, DoRA or trainable tokens are the host's to apply there), and the table already resident:
// a tied model's lm_head, or an untied one's table uploaded beside the weights when no
// --gpu-memory cap counts it.
bool cuda_gathers_embeddings(const ModelSpec& spec, const ForwardOptions& opt);

// One step of incremental decoding on GPU 0 (model/forward.hpp's forward_step with --device
// cuda): the tokens `ids` at positions [cache.past, cache.past + T) attend to the keys and values
// kept on the GPU in cache.device (made at the first step, sized for cache.capacity positions)
// and to each other; theirs are appended. The embedding rows are gathered on the GPU (the table
// is uploaded with the weights), so a step moves the ids up and, as generate computes them, the
// last position's logits ([1, vocab]) down, or with opt.step_logits = false only their argmax
// and whether they are finite. Does not advance cache.past. Throws InputError past the capacity,
// for an id outside the vocabulary, and where forward_cuda does.
struct CudaStep {
  std::vector<float> logits;  // [vocab]; empty with step_logits = false
  int64_t argmax = -1;        // with step_logits = false: the first index of the largest logit
  bool finite = true;         // with step_logits = false: every logit finite
  uint64_t weight_bytes = 0;
};
CudaStep forward_cuda_step(const Checkpoint& ck, std::span<const int64_t> ids, KvCache& cache,
                           const ForwardOptions& opt);

// For the tests: x [cols] . w [rows, cols]^T with the values rounded to `dt` and in its storage,
// as a decode step's product: through cuda::gemv (the step's kernel) or through cuBLAS (as torch
// calls it), the output in the run dtype.
std::vector<float> cuda_matvec(std::span<const float> w, std::span<const float> x, int64_t rows,
                               int64_t cols, DType dt, bool gemv);

// Whether this build has the CUDA backend (NANSCOPE_CUDA).
bool cuda_built();

}  // namespace nanscope

namespace nanscope {

// `--device` of the commands: "cpu" or "cuda". Throws InputError for anything else, and for
// "cuda" in a build without the backend (saying how to build it).
Device parse_device_flag(std::string_view value);

}  // namespace nanscope
