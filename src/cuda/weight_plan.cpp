#include "cuda/weight_plan.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "common/error.hpp"

namespace nanscope {

int64_t GpuWeightPlan::streamed_layers() const {
  return std::count(streamed.begin(), streamed.end(), true);
}

uint64_t layer_matrix_bytes(const LayerSpec& s, int64_t hidden, DType run) {
  const uint64_t eb = uint64_t(dtype_bits(run) / 8);
  const auto mat = [&](int64_t rows, int64_t cols) {
    const uint64_t b = uint64_t(rows) * uint64_t(cols) * eb;
    return (b + kSlotAlign - 1) / kSlotAlign * kSlotAlign;
  };
  const AttentionSpec& a = s.attn;
  const int64_t qd = a.heads * a.head_dim, kvd = a.kv_heads * a.head_dim, I = s.mlp.intermediate;
  return mat(qd, hidden) + 2 * mat(kvd, hidden) + mat(hidden, qd) + 2 * mat(I, hidden) +
         mat(hidden, I);
}

std::string format_bytes(uint64_t bytes) {
  const double b = double(bytes);
  if (b >= 1073741824.0) return fmt::format("{:.2f} GiB", b / 1073741824.0);
  if (b >= 1048576.0) return fmt::format("{:.1f} MiB", b / 1048576.0);
  return fmt::format("{:.1f} KiB", b / 1024.0);
}

GpuWeightPlan plan_gpu_weights(std::span<const uint64_t> layer_bytes, uint64_t fixed,
                               uint64_t cap) {
  GpuWeightPlan p;
  const size_t n = layer_bytes.size();
  p.streamed.assign(n, false);
  uint64_t all = fixed, largest = 0;
  for (uint64_t b : layer_bytes) all += b, largest = std::max(largest, b);
  // Two slots of the largest layer: the plan may stream any layer (a slot is sized once).
  p.minimum = n <= 1 ? all : fixed + 2 * largest;
  p.resident_bytes = all;
  if (cap == 0 || all <= cap) return p;
  if (cap < p.minimum)
    fail(
        "--gpu-memory {}: this model's weights need at least {} on the GPU (lm_head, norms and "
        "two layers' matrices, the rest streamed in turn); all of them take {}",
        format_bytes(cap), format_bytes(p.minimum), format_bytes(all));
  // Resident layers: as many as fit beside the two slots (the layers here share one shape but for
  // few families; the budget counts the largest, which keeps the plan simple and under the cap).
  const uint64_t room = cap - fixed - 2 * largest;
  const int64_t keep =
      std::min<int64_t>(int64_t(n) - 2, int64_t(room / std::max<uint64_t>(largest, 1)));
  const int64_t stream = int64_t(n) - std::max<int64_t>(keep, 0);
  // Layer i is streamed when the stream count's even spread steps there: i*S/N and (i+1)*S/N
  // differ (the last layer is always streamed when any is).
  for (size_t i = 0; i < n; ++i)
    p.streamed[i] = (int64_t(i + 1) * stream) / int64_t(n) > (int64_t(i) * stream) / int64_t(n);
  p.resident_bytes = fixed;
  p.slot_bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    if (p.streamed[i])
      p.slot_bytes = std::max(p.slot_bytes, layer_bytes[i]);
    else
      p.resident_bytes += layer_bytes[i];
  }
  return p;
}

uint64_t fixed_weight_bytes(const ModelSpec& spec, DType run, bool decode) {
  const uint64_t eb = uint64_t(dtype_bits(run) / 8), H = uint64_t(spec.hidden);
  uint64_t b = uint64_t(spec.vocab) * H * eb * (decode && !spec.tied ? 2 : 1) + 4 * H;
  for (const LayerSpec& s : spec.layers) {
    const uint64_t qd = uint64_t(s.attn.heads * s.attn.head_dim),
                   kvd = uint64_t(s.attn.kv_heads * s.attn.head_dim),
                   I = uint64_t(s.mlp.intermediate);
    b += 4 * (4 * H + 2 * uint64_t(s.attn.head_dim) + qd + 2 * kvd + H + 2 * I + H);
  }
  return b;
}

GpuWeightPlan plan_gpu_weights(const ModelSpec& spec, DType run, bool decode, uint64_t cap) {
  std::vector<uint64_t> layer_bytes;
  for (const LayerSpec& s : spec.layers)
    layer_bytes.push_back(layer_matrix_bytes(s, spec.hidden, run));
  return plan_gpu_weights(layer_bytes, fixed_weight_bytes(spec, run, decode), cap);
}

}  // namespace nanscope
