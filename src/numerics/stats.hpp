// Per-element value statistics, the one type for stored tensors (scan, check, merge) and for
// activations (trace's sites, hidden states and logits): NaN / inf counts, values beyond the
// fp16 range, min / max and the largest finite magnitude. Counted element by element (never from
// a sum, which would miss inf and mixed signs), on the raw bits, so one pass reads each byte
// once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "numerics/dtype.hpp"

namespace nanscope {

struct ValueStats {
  uint64_t count = 0;  // elements looked at
  uint64_t nan = 0;
  uint64_t inf = 0;
  uint64_t fp16_range = 0;       // finite values with |x| > 65504 (would become inf in fp16)
  float abs_max = 0.0f;          // largest finite |x|
  float min = 0.0f, max = 0.0f;  // over finite values (0 when none)
  bool any_finite = false;
  uint64_t nonfinite() const { return nan + inf; }
  bool finite() const { return nan == 0 && inf == 0; }
  void merge(const ValueStats& o);
};

// Statistics of n elements of a float dtype (F32, BF16, F16) stored little-endian at p.
ValueStats value_stats(const std::byte* p, size_t n, DType t);
// The same over fp32 values already in memory (activations).
ValueStats value_stats(std::span<const float> x);
// Plain scalar version the fast one is tested against.
ValueStats value_stats_reference(const std::byte* p, size_t n, DType t);

// Whether every value is finite (stops at the first that is not).
bool all_finite(std::span<const float> x);
// The same for values stored in a float dtype (F32, BF16, F16 bytes): an exponent of all ones.
bool all_finite_stored(std::span<const std::byte> bytes, DType t);

}  // namespace nanscope
