// Random KV-like bytes for tests: bf16 values drawn from a normal distribution (finite, as real K
// and V are, so lossy codecs take them). Header-only; no state of its own.
#pragma once

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvf/gpudirect/kv_codec_math.h"

namespace kvf::test {

// `bytes` (even) of bf16 values ~ N(0, sigma), drawn from `rng`.
inline std::vector<uint8_t> random_bf16_kv(uint64_t bytes, std::mt19937& rng, float sigma = 1.5f) {
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<uint8_t> data(bytes);
  for (size_t i = 0; i + 1 < bytes; i += 2) {
    const uint16_t v = codec_math::float_to_bf16(normal(rng));
    std::memcpy(&data[i], &v, 2);
  }
  return data;
}

}  // namespace kvf::test
