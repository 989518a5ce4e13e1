#include "kvf/fabric/stream_pattern.h"

#include <cstring>

namespace kvf::fabric {
namespace {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline uint64_t stream_base(const PatternKey& k) {
  uint64_t h = splitmix64(k.seed);
  h = splitmix64(h ^ (uint64_t{k.layer} << 32 | k.block));
  return splitmix64(h ^ k.part);
}

}  // namespace

void fill_pattern(uint8_t* dst, uint64_t bytes, const PatternKey& key) {
  const uint64_t base = stream_base(key);
  const uint64_t words = bytes / 8;
  for (uint64_t i = 0; i < words; ++i) {
    uint64_t v = splitmix64(base + i);
    std::memcpy(dst + i * 8, &v, 8);
  }
}

std::optional<uint64_t> find_pattern_mismatch(const uint8_t* src, uint64_t bytes, const PatternKey& key) {
  const uint64_t base = stream_base(key);
  const uint64_t words = bytes / 8;
  for (uint64_t i = 0; i < words; ++i) {
    uint64_t expected = splitmix64(base + i);
    uint64_t got;
    std::memcpy(&got, src + i * 8, 8);
    if (got != expected) {
      for (uint64_t b = 0; b < 8; ++b) {
        if (reinterpret_cast<const uint8_t*>(&got)[b] != reinterpret_cast<const uint8_t*>(&expected)[b]) {
          return i * 8 + b;
        }
      }
    }
  }
  return std::nullopt;
}

void poison(uint8_t* dst, uint64_t bytes) {
  std::memset(dst, kPoisonByte, bytes);
}

}  // namespace kvf::fabric
