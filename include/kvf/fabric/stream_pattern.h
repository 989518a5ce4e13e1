// Deterministic test data for KV streams: the bytes that block `block`, part `part` of layer
// `layer` hold for a given seed, so that a receiver can verify every byte it got without the
// sender shipping a copy. Looks random (splitmix64 per 8-byte word). Free functions, no state.
#pragma once

#include <cstdint>
#include <optional>

namespace kvf::fabric {

struct PatternKey {
  uint64_t seed = 0;
  uint32_t layer = 0;
  uint32_t block = 0;  // the block's index within the request (not a pool slot)
  uint32_t part = 0;
};

// `bytes` must be a multiple of 8.
void fill_pattern(uint8_t* dst, uint64_t bytes, const PatternKey& key);
// The offset of the first byte that differs from the pattern, or nullopt when all match.
std::optional<uint64_t> find_pattern_mismatch(const uint8_t* src, uint64_t bytes, const PatternKey& key);
// What unwritten destination bytes hold: a fixed value, so verification catches them (the
// pattern is pseudo-random, so a whole block of it never matches).
inline constexpr uint8_t kPoisonByte = 0xA5;
// Fills with kPoisonByte.
void poison(uint8_t* dst, uint64_t bytes);

}  // namespace kvf::fabric
