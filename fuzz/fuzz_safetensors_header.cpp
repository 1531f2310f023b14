// libFuzzer target: parse_safetensors must either accept a byte string or throw
// SafetensorsError. Any other exception, crash or sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "formats/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const nanscope::SafetensorsHeader h = nanscope::parse_safetensors(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size), "fuzz");
    // Accepted: the invariants callers rely on must hold.
    uint64_t expected = 0;
    for (const nanscope::TensorInfo& t : h.tensors) {
      if (t.begin != expected || t.end < t.begin) std::abort();
      if (t.nbytes() * 8 != t.numel() * uint64_t(nanscope::dtype_bits(t.dtype))) std::abort();
      expected = t.end;
    }
    if (8 + h.header_size + h.data_size() != size) std::abort();
  } catch (const nanscope::SafetensorsError&) {
  }
  return 0;
}
