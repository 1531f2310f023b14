#include "numerics/dtype.hpp"

#include <cctype>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/strings.hpp"
#include "numerics/dtype_simd.hpp"

namespace nanscope {

namespace {

struct DTypeRow {
  DType type;
  std::string_view name;
  int bits;
};

// Sizes as in the reference reader (safetensors `Dtype::bitsize`).
constexpr DTypeRow kDTypes[] = {
    {DType::BOOL, "BOOL", 8},       {DType::U8, "U8", 8},           {DType::I8, "I8", 8},
    {DType::F8_E5M2, "F8_E5M2", 8}, {DType::F8_E4M3, "F8_E4M3", 8}, {DType::F8_E8M0, "F8_E8M0", 8},
    {DType::F4, "F4", 4},           {DType::F6_E2M3, "F6_E2M3", 6}, {DType::F6_E3M2, "F6_E3M2", 6},
    {DType::I16, "I16", 16},        {DType::U16, "U16", 16},        {DType::F16, "F16", 16},
    {DType::BF16, "BF16", 16},      {DType::I32, "I32", 32},        {DType::U32, "U32", 32},
    {DType::F32, "F32", 32},        {DType::F64, "F64", 64},        {DType::I64, "I64", 64},
    {DType::U64, "U64", 64},        {DType::C64, "C64", 64},
};

const DTypeRow& row(DType t) {
  for (const DTypeRow& r : kDTypes) {
    if (r.type == t) return r;
  }
  throw std::invalid_argument("nanscope: invalid DType value " + std::to_string(int(t)));
}

[[noreturn]] void not_float(const char* op, DType t) {
  throw std::invalid_argument(std::string(op) + ": dtype " + std::string(dtype_name(t)) +
                              " is not one of F32, BF16, F16");
}

}  // namespace

int dtype_bits(DType t) {
  return row(t).bits;
}

std::string_view dtype_name(DType t) {
  return row(t).name;
}

std::optional<DType> parse_float_dtype(std::string_view s0) {
  std::string s = ascii_lower(s0);
  if (s.rfind("torch.", 0) == 0) s = s.substr(6);
  if (s == "fp32" || s == "float32" || s == "f32" || s == "float") return DType::F32;
  if (s == "bf16" || s == "bfloat16") return DType::BF16;
  if (s == "fp16" || s == "float16" || s == "f16" || s == "half") return DType::F16;
  return std::nullopt;
}

std::string_view float_dtype_spellings() {
  return "fp32, bf16 or fp16 (also float32, bfloat16, float16, half, with or without torch., any "
         "case)";
}

std::optional<DType> parse_dtype(std::string_view safetensors_name) {
  for (const DTypeRow& r : kDTypes) {
    if (r.name == safetensors_name) return r.type;
  }
  return std::nullopt;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) {
    // inf, or NaN with the quiet bit set (as the F16C instruction does).
    const uint32_t nan_bits = mant ? (0x00400000u | (mant << 13)) : 0u;
    return std::bit_cast<float>(sign | 0x7f800000u | nan_bits);
  }
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in fp32.
    const float v = float(mant) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(v));
  }
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

uint16_t f32_to_f16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) {
    // NaN: keep the top payload bits, set the quiet bit (matches F16C).
    return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  }
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // |x| >= 65520 (or inf) -> inf
  if (a >= 0x38800000u) {
    // Normal fp16 range (>= 2^-14): rebias the exponent by 127 - 15, then round to nearest even
    // on the 13 dropped bits; a carry moves into the exponent as it should.
    uint32_t v = a - 0x38000000u;
    v += 0x0fffu + ((v >> 13) & 1u);
    return uint16_t(sign | (v >> 13));
  }
  // Subnormal or zero: adding 0.5 puts the value where the fp32 ulp is 2^-24, the fp16 subnormal
  // step, so the FPU's own round-to-nearest-even does the rounding. A result of 0x400 is the
  // smallest normal, which is also the right encoding.
  const float t = std::bit_cast<float>(a) + 0.5f;
  return uint16_t(sign | (std::bit_cast<uint32_t>(t) - 0x3f000000u));
}

float round_to(float x, DType t) {
  switch (t) {
    case DType::F32:
    case DType::F64:
      return x;
    case DType::BF16:
      return round_bf16(x);
    case DType::F16:
      return round_f16(x);
    default:
      not_float("round_to", t);
  }
}

float dtype_max(DType t) {
  switch (t) {
    case DType::F32:
      return std::numeric_limits<float>::max();  // 3.4028235e38
    case DType::BF16:
      return std::bit_cast<float>(0x7f7f0000u);  // 3.3895314e38
    case DType::F16:
      return 65504.0f;
    case DType::F8_E4M3:
      return 448.0f;  // e4m3fn: no inf, S.1111.111 is NaN
    case DType::F8_E5M2:
      return 57344.0f;
    case DType::F8_E8M0:
      return 0x1p127f;
    case DType::F6_E3M2:
      return 28.0f;
    case DType::F6_E2M3:
      return 7.5f;
    case DType::F4:
      return 6.0f;  // e2m1
    default:
      throw std::invalid_argument("dtype_max: dtype " + std::string(dtype_name(t)) +
                                  " has no fp32 maximum");
  }
}

float dtype_lowest(DType t) {
  // E8M0 is unsigned (scales only): its lowest is its smallest power of two.
  if (t == DType::F8_E8M0) return 0x1p-127f;
  return -dtype_max(t);
}

// ---- bulk conversions -----------------------------------------------------------------------
// Vector bodies with scalar tails; every lane computes exactly what the scalar function does
// (tests compare them bit for bit).

void store_from_f32(const float* in, DType t, std::byte* out, size_t n) {
  size_t i = 0;
  switch (t) {
    case DType::F32:
      if (n) std::memcpy(out, in, n * sizeof(float));
      return;
    case DType::BF16: {
#if NANSCOPE_HAVE_AVX2_F16C
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i),
                         simd::to_bf16x8(_mm256_loadu_ps(in + i)));
#endif
      for (; i < n; ++i) {
        const uint16_t h = f32_to_bf16(in[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
      return;
    }
    case DType::F16: {
#if NANSCOPE_HAVE_AVX2_F16C
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i),
                         simd::to_f16x8(_mm256_loadu_ps(in + i)));
#endif
      for (; i < n; ++i) {
        const uint16_t h = f32_to_f16(in[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
      return;
    }
    default:
      not_float("store_from_f32", t);
  }
}

void load_to_f32(const std::byte* in, DType t, float* out, size_t n) {
  size_t i = 0;
  switch (t) {
    case DType::F32:
      if (n) std::memcpy(out, in, n * sizeof(float));
      return;
    case DType::BF16: {
#if NANSCOPE_HAVE_AVX2_F16C
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, simd::load_bf16x8(in + 2 * i));
#endif
      for (; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, in + 2 * i, 2);
        out[i] = bf16_to_f32(h);
      }
      return;
    }
    case DType::F16: {
#if NANSCOPE_HAVE_AVX2_F16C
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, simd::load_f16x8(in + 2 * i));
#endif
      for (; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, in + 2 * i, 2);
        out[i] = f16_to_f32(h);
      }
      return;
    }
    default:
      not_float("load_to_f32", t);
  }
}

void round_inplace(float* x, size_t n, DType t) {
  size_t i = 0;
  switch (t) {
    case DType::F32:
      return;
    case DType::BF16: {
#if NANSCOPE_HAVE_AVX2_F16C
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, simd::round_bf16x8(_mm256_loadu_ps(x + i)));
#endif
      for (; i < n; ++i) x[i] = round_bf16(x[i]);
      return;
    }
    case DType::F16: {
#if NANSCOPE_HAVE_AVX2_F16C
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, simd::round_f16x8(_mm256_loadu_ps(x + i)));
#endif
      for (; i < n; ++i) x[i] = round_f16(x[i]);
      return;
    }
    default:
      not_float("round_inplace", t);
  }
}

}  // namespace nanscope
