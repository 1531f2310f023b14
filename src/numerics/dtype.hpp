// Element types of safetensors files and the exact conversions between bf16, fp16 and fp32.
// The conversions are written by hand because they must be bit-exact with torch (round to nearest
// even, NaN kept quiet, fp16 overflow to inf) and branch-light enough to vectorise.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace nanscope {

enum class DType : uint8_t {
  BOOL,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  F8_E8M0,
  F4,
  F6_E2M3,
  F6_E3M2,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  F64,
  I64,
  U64,
  C64,
};

// Size in bits (F4 and F6 pack below a byte).
int dtype_bits(DType t);
std::string_view dtype_name(DType t);  // the safetensors spelling: "BF16"
std::optional<DType> parse_dtype(std::string_view safetensors_name);
// The one spelling table of the float dtypes users type (flags, Python, config.json's `dtype`):
// fp32 float32 f32 float, bf16 bfloat16, fp16 float16 f16 half, each also with a `torch.`
// prefix, case-insensitive. Anything else: nullopt.
std::optional<DType> parse_float_dtype(std::string_view s);
// What parse_float_dtype accepts, for messages and --help: "fp32, bf16 or fp16 (also float32,
// bfloat16, float16, half, with or without torch., any case)".
std::string_view float_dtype_spellings();
inline bool is_float_computable(DType t) {
  return t == DType::F32 || t == DType::BF16 || t == DType::F16;
}

// ---- scalar conversions -------------------------------------------------------------------
inline float bf16_to_f32(uint16_t h) {
  return std::bit_cast<float>(uint32_t(h) << 16);
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// The value x takes once stored in dtype t and read back (identity for F32).
inline float round_bf16(float x) {
  return bf16_to_f32(f32_to_bf16(x));
}
inline float round_f16(float x) {
  return f16_to_f32(f32_to_f16(x));
}
float round_to(float x, DType t);

// Largest finite value and the mask value transformers uses (finfo(dtype).min).
float dtype_max(DType t);
float dtype_lowest(DType t);

// Reads element i of a raw little-endian buffer of a float dtype as fp32.
inline float load_as_f32(const std::byte* p, DType t, size_t i) {
  switch (t) {
    case DType::F32: {
      uint32_t u;
      __builtin_memcpy(&u, p + 4 * i, 4);
      return std::bit_cast<float>(u);
    }
    case DType::BF16: {
      uint16_t u;
      __builtin_memcpy(&u, p + 2 * i, 2);
      return bf16_to_f32(u);
    }
    case DType::F16: {
      uint16_t u;
      __builtin_memcpy(&u, p + 2 * i, 2);
      return f16_to_f32(u);
    }
    default:
      return 0.0f;
  }
}

// Converts n fp32 values to dtype t (bf16/f16/f32) into out (raw little-endian bytes).
void store_from_f32(const float* in, DType t, std::byte* out, size_t n);
// Converts n values of dtype t (bf16/f16/f32) to fp32.
void load_to_f32(const std::byte* in, DType t, float* out, size_t n);
// Rounds n fp32 values in place as if stored in dtype t.
void round_inplace(float* x, size_t n, DType t);

}  // namespace nanscope
