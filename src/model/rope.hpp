// Rotary position embeddings exactly as transformers computes them: the inverse frequencies of
// each rope type (modeling_rope_utils.py, in float32 tensor arithmetic), cos/sin tables in fp32
// times the attention scaling, cast to the run dtype, and apply_rotary_pos_emb with its three
// roundings. Supported rope types: default, linear, dynamic, yarn, llama3, longrope; any other type
// is an InputError naming it.
#pragma once

#include <cstdint>
#include <vector>

#include "formats/hf_config.hpp"
#include "numerics/dtype.hpp"

namespace nanscope {

struct RopeParameters {
  std::vector<float> inv_freq;     // dim / 2 values, float32 as transformers' `inv_freq` buffer
  double attention_scaling = 1.0;  // multiplies cos and sin (yarn), 1 otherwise
};

// The inverse frequencies for a forward over positions 0..seq_len-1. Only `dynamic` depends on
// seq_len: above max_position_embeddings transformers recomputes them (dynamic_rope_update).
RopeParameters rope_parameters(const ModelConfig& c, int64_t seq_len);
// The same for one set of rope parameters (Gemma 3 has one per layer type) over `dim` rotary
// dimensions (head_dim, or fewer with partial_rotary_factor). longrope, like dynamic, depends
// on seq_len (the long factors once it passes original_max_position_embeddings).
RopeParameters rope_parameters(const ModelConfig& c, const RopeConfig& r, int64_t dim,
                               int64_t seq_len);
bool rope_depends_on_length(const RopeConfig& r);

// cos and sin, [T, D] row-major, already cast to the run dtype.
// Rows [first, T) of the tables of a T-position pass (`dynamic` and `longrope` frequencies follow
// T): a decode step at position P needs row P only, not the P rows before it again.
struct RopeTables {
  int64_t T = 0, D = 0, first = 0;
  std::vector<float> cos, sin;  // [T - first, D]
};
RopeTables rope_tables(const ModelConfig& c, int64_t T, DType dt);
RopeTables rope_tables(const ModelConfig& c, const RopeConfig& r, int64_t dim, int64_t T, DType dt,
                       int64_t first = 0);

// In place on x [T, heads, D] holding positions pos0 .. pos0+T-1 (rows of `tab`):
// x = round(round(x * cos) + round(rotate_half(x) * sin)), rotate_half(x) = cat(-x[D/2:], x[:D/2]).
// Heads are head_dim apart (0: tab.D); dimensions past tab.D are left as they are (partial
// rotary embeddings).
void apply_rope(float* x, int64_t T, int64_t heads, const RopeTables& tab, DType dt,
                int64_t pos0 = 0, int64_t head_dim = 0);

}  // namespace nanscope
