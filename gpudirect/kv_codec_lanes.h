// Branch-free restatements of kv_codec_math.h's conversions for the CPU codec's vectorized loops
// (gpudirect/kv_codec.cpp): GCC turns a branch or a ternary over floats into control flow that
// its vectorizer refuses (with -ftrapping-math, the default, it may not run a float operation the
// source did not), and baseline x86-64 makes a libm call of nearbyintf. Each function here gives
// the bits of its header counterpart for every input it is documented for; the unit test
// (tests/unit/test_kv_codec.cpp) checks that over wide samples of all floats. Private to
// gpudirect; pure inline functions.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kvf/gpudirect/kv_codec_math.h"

namespace kvf::codec_lanes {

namespace cm = kvf::codec_math;

// a where take_a, else b, as bit masks. GCC turns a ternary over floats back into a branch
// around the float operations that feed it, and then will not vectorize the loop (with
// -ftrapping-math, the default, it may not execute a float operation the source did not);
// selecting the bits as integers keeps every lane's operations unconditional.
inline uint32_t select_bits(bool take_a, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(take_a);
  return (a & mask) | (b & ~mask);
}

// Round to nearest, ties to even, for |v| < 2^22: adding 1.5 * 2^23 lands in [2^23, 2^24), where
// floats are the integers, and taking it away is exact (nearbyint's result in the default rounding
// mode, bar the sign of a zero).
inline float round_even_small(float v) {
  constexpr float kMagic = 12582912.0f;
  return cm::sub(cm::add(v, kMagic), kMagic);
}

// clamp_value(round_even(v), lo, hi) for bounds inside +-2^22: below 2^22 round_even_small is
// round_even; past it both land beyond the bounds (inf stays inf), and NaN stays NaN, which the
// clamp maps to lo either way. Only a zero's sign can differ, and it converts to the same code.
inline float round_clamp(float v, float lo, float hi) {
  return cm::clamp_value(round_even_small(v), lo, hi);
}

// codec_math::float_to_e4m3 with its branches as selects, its float compares as compares of the
// magnitude's bits (which order like the values). Normal values round by adding 0x7ffff plus the
// kept mantissa's low bit below bit 20 (a carry moves into the exponent as the header's
// `++mantissa` does); the header's overflow test cannot fire below 448, so it is the >= 448 select.
// Also gives the code's value (codec_math::e4m3_to_float of it), which the encoder's error needs:
// the rounded float with its low 20 bits cleared, steps * 2^-9, 448, or 0 for NaN.
struct E4m3 {
  uint32_t code;
  float value;
};
inline E4m3 e4m3_lane(float f) {
  constexpr uint32_t kMinNormal = 0x3c800000u;  // 2^-6
  constexpr uint32_t kMax = 0x43e00000u;        // 448
  const uint32_t u = cm::as_bits(f);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t magnitude = u & 0x7fffffffu;
  // Below 2^-6: steps of 2^-9, in [0, 8]. The min keeps the other lanes in that range.
  const float steps = round_even_small(cm::mul(cm::as_float(std::min(magnitude, kMinNormal)), 512.0f));
  const auto subnormal = static_cast<uint32_t>(static_cast<int32_t>(steps));
  const uint32_t rounded = magnitude + 0x7ffffu + ((magnitude >> 20) & 1u);
  const uint32_t normal = (rounded >> 20) - (120u << 3);  // (biased exponent - 127 + 7) << 3 | mantissa
  const bool is_subnormal = magnitude < kMinNormal;
  const bool saturated = magnitude >= kMax;
  const bool nan = magnitude > 0x7f800000u;
  uint32_t code = select_bits(is_subnormal, subnormal, normal);
  code = select_bits(saturated, 0x7eu, code);
  code = select_bits(nan, 0u, code | (sign >> 24));  // NaN gives 0
  uint32_t value =
      select_bits(is_subnormal, cm::as_bits(cm::mul(steps, 0.001953125f)), rounded & 0xfff00000u);
  value = select_bits(saturated, kMax, value);
  value = select_bits(nan, 0u, value | sign);
  return E4m3{code, cm::as_float(value)};
}

// codec_math::e4m3_to_float with its branches as selects.
inline float e4m3_to_float_lane(uint8_t b) {
  const uint32_t sign = uint32_t{b & 0x80u} << 24;
  const uint32_t exponent = (b >> 3) & 0xfu;
  const uint32_t mantissa = b & 0x7u;
  const uint32_t subnormal =
      cm::as_bits(cm::mul(static_cast<float>(static_cast<int32_t>(mantissa)), 0.001953125f)) | sign;
  const uint32_t normal = sign | ((exponent + 120u) << 23) | (mantissa << 20);
  uint32_t bits = select_bits(exponent == 0, subnormal, normal);
  bits = select_bits((b & 0x7fu) == 0x7fu, sign | 0x7fc00000u, bits);
  return cm::as_float(bits);
}

// codec_math::float_to_half with its three cases computed and selected (the subnormal case's float
// add runs on every lane; its result is dropped where not wanted).
inline uint16_t half_lane(float f) {
  constexpr uint32_t kF32Infinity = 255u << 23;
  constexpr uint32_t kF16Max = (127u + 16u) << 23;
  constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t bits = cm::as_bits(f);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t u = bits ^ sign;
  const uint32_t big = select_bits(u > kF32Infinity, 0x7e00u, 0x7c00u);
  const uint32_t subnormal = cm::as_bits(cm::add(cm::as_float(u), cm::as_float(kDenormMagic))) - kDenormMagic;
  const uint32_t normal = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  uint32_t out = select_bits(u < (113u << 23), subnormal, normal);
  out = select_bits(u >= kF16Max, big, out);
  return static_cast<uint16_t>((out | (sign >> 16)) & 0xffffu);
}

// codec_math::half_to_float with its cases as selects.
inline float half_to_float_lane(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  const uint32_t subnormal =
      cm::as_bits(cm::mul(static_cast<float>(static_cast<int32_t>(mantissa)), 5.9604644775390625e-8f)) | sign;
  const uint32_t special = sign | 0x7f800000u | (mantissa << 13);
  const uint32_t normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  uint32_t out = select_bits(exponent == 0, subnormal, normal);
  out = select_bits(exponent == 31, special, out);
  return cm::as_float(out);
}

// An int16 that orders like the bf16 value (a negative value's magnitude bits flipped), so min and
// max are integer work (pminsw/pmaxsw; float compares, with their NaN rules, stay scalar). It
// orders -0 below +0 (the KIVI metadata makes a zero min or max +0 anyway) and puts NaN past the
// infinities. Its own inverse.
inline uint16_t bf16_order(uint16_t b) {
  return static_cast<uint16_t>(b ^ ((0u - (uint32_t{b} >> 15)) & 0x7fffu));
}
inline int16_t order_key(uint16_t b) {
  return static_cast<int16_t>(bf16_order(b));
}
inline float order_value(int16_t key) {
  return cm::bf16_to_float(bf16_order(static_cast<uint16_t>(key)));
}

}  // namespace kvf::codec_lanes
