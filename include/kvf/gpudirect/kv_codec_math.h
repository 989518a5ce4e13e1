// The per-value arithmetic of the KV codecs (protocol/kv_codec.h), written once for the CPU and the
// GPU so that both encode to the same bytes: bf16, fp16 and fp8 e4m3 conversions with round to
// nearest even, and the float operations the codecs use, each one IEEE-rounded on its own (on the
// GPU __fmul_rn and friends, which nvcc never fuses into an FMA; the CPU side is compiled with
// -ffp-contract=off). Pure functions; no state.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define KVF_CODEC_HD __host__ __device__ __forceinline__
#else
#define KVF_CODEC_HD inline
#include <cmath>
#endif

namespace kvf::codec_math {

KVF_CODEC_HD float as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

KVF_CODEC_HD uint32_t as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

KVF_CODEC_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
KVF_CODEC_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
KVF_CODEC_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
KVF_CODEC_HD float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round to the nearest integer, ties to even.
KVF_CODEC_HD float round_even(float a) {
#if defined(__CUDA_ARCH__)
  return rintf(a);
#else
  return std::nearbyint(a);
#endif
}
KVF_CODEC_HD float abs_value(float a) {
  return as_float(as_bits(a) & 0x7fffffffu);
}
KVF_CODEC_HD float max_value(float a, float b) {
  return a > b ? a : b;
}
KVF_CODEC_HD float min_value(float a, float b) {
  return a < b ? a : b;
}
KVF_CODEC_HD float clamp_value(float a, float lo, float hi) {
  return min_value(max_value(a, lo), hi);
}

KVF_CODEC_HD float bf16_to_float(uint16_t b) {
  return as_float(uint32_t{b} << 16);
}

// Round to nearest even; NaN stays a quiet NaN.
KVF_CODEC_HD uint16_t float_to_bf16(float f) {
  uint32_t u = as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE binary16, round to nearest even (F. Giesen's float_to_half_fast3_rtne); past 65504 gives inf.
KVF_CODEC_HD uint16_t float_to_half(float f) {
  constexpr uint32_t kF32Infinity = 255u << 23;
  constexpr uint32_t kF16Max = (127u + 16u) << 23;
  constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = as_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t out;
  if (u >= kF16Max) {
    out = u > kF32Infinity ? 0x7e00 : 0x7c00;
  } else if (u < (113u << 23)) {
    const float t = add(as_float(u), as_float(kDenormMagic));
    out = static_cast<uint16_t>(as_bits(t) - kDenormMagic);
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    u += mantissa_odd;
    out = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

KVF_CODEC_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    // Subnormal or zero: mantissa * 2^-24, exact in binary32.
    const float magnitude = mul(static_cast<float>(mantissa), 5.9604644775390625e-8f);
    return as_float(as_bits(magnitude) | sign);
  }
  if (exponent == 31) return as_float(sign | 0x7f800000u | (mantissa << 13));
  return as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// OCP fp8 E4M3 (bias 7, largest finite 448, no infinity): round to nearest even, saturating at
// +-448; NaN input gives 0 (the codecs never produce NaN).
KVF_CODEC_HD uint8_t float_to_e4m3(float f) {
  const uint32_t u = as_bits(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return 0;
  const float a = as_float(magnitude);
  if (a >= 448.0f) return static_cast<uint8_t>(sign | 0x7e);
  if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9 (a code of 8 is the smallest normal)
    const float q = round_even(mul(a, 512.0f));
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(q));
  }
  int exponent = static_cast<int>(magnitude >> 23) - 127;
  uint32_t mantissa = (magnitude & 0x7fffffu) >> 20;
  const uint32_t rest = magnitude & 0xfffffu;
  if (rest > 0x80000u || (rest == 0x80000u && (mantissa & 1u))) ++mantissa;
  if (mantissa == 8) {
    mantissa = 0;
    ++exponent;
  }
  if (exponent > 8 || (exponent == 8 && mantissa > 6)) return static_cast<uint8_t>(sign | 0x7e);
  return static_cast<uint8_t>(sign | (static_cast<uint32_t>(exponent + 7) << 3) | mantissa);
}

KVF_CODEC_HD float e4m3_to_float(uint8_t b) {
  const uint32_t sign = uint32_t{b & 0x80u} << 24;
  const uint32_t exponent = (b >> 3) & 0xfu;
  const uint32_t mantissa = b & 0x7u;
  if (exponent == 0) return as_float(as_bits(mul(static_cast<float>(mantissa), 0.001953125f)) | sign);
  if (exponent == 15 && mantissa == 7) return as_float(sign | 0x7fc00000u);
  return as_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

}  // namespace kvf::codec_math
