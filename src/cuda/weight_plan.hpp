// Which weights stay on the GPU under `--gpu-memory` (Backend::cuda_weight_cap), and which layers
// are streamed: copied in per pass from page-locked host memory into one of two slots on the GPU,
// the next one while the current one computes. Host arithmetic only (tested without a GPU).
//
// Always resident: lm_head, the final norm, every layer's norm and bias vectors (small) and, for
// decoding an untied model, the embedding table. Of the layers' matrices, as many as the cap leaves
// room for beside two slots stay; the streamed ones are spread evenly over the depth, so that a
// streamed layer's copy overlaps the compute of the resident layers before it, not only of one.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "model/arch.hpp"
#include "numerics/dtype.hpp"

namespace nanscope {

struct GpuWeightPlan {
  std::vector<bool> streamed;   // per layer
  uint64_t slot_bytes = 0;      // one slot: the largest streamed layer's matrices (0: none)
  uint64_t resident_bytes = 0;  // what stays: fixed + the resident layers' matrices
  uint64_t minimum = 0;         // the smallest cap this model runs under (fixed + two slots)
  int64_t streamed_layers() const;
};

// Bytes of a layer's matrices (q, k, v, o, gate, up, down) in the run dtype, aligned as the GPU
// path lays them out in a slot (kSlotAlign per matrix).
inline constexpr uint64_t kSlotAlign = 256;
uint64_t layer_matrix_bytes(const LayerSpec& s, int64_t hidden, DType run);

// layer_bytes: layer_matrix_bytes per layer; fixed: the always-resident bytes. cap 0: nothing
// streamed. Throws InputError (naming --gpu-memory, the cap and the minimum) when cap < minimum.
GpuWeightPlan plan_gpu_weights(std::span<const uint64_t> layer_bytes, uint64_t fixed, uint64_t cap);

// The bytes that stay on the GPU whatever the cap: lm_head, the embedding table where decoding
// (`decode`) an untied model gathers from it, and an upper bound of the norms and biases (fp32).
uint64_t fixed_weight_bytes(const ModelSpec& spec, DType run, bool decode);

// The plan of a model's weights in run dtype `run` under `cap` (the two functions above).
GpuWeightPlan plan_gpu_weights(const ModelSpec& spec, DType run, bool decode, uint64_t cap);

// "4.00 GiB": sizes in messages.
std::string format_bytes(uint64_t bytes);

}  // namespace nanscope
