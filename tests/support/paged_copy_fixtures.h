// Shared by the paged-copy tests (CPU and GPU): the seed, layouts and random data they draw from,
// so both check the same shapes. Test code only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "catch.h"
#include "kvf/protocol/kv_layout.h"

namespace kvf::test {

inline constexpr uint8_t kPoison = 0xA5;

// One seed per test run, printed; KVF_TEST_SEED=<n> repeats a run.
inline uint64_t test_seed(const char* test_name) {
  static const uint64_t seed = [test_name] {
    const char* env = std::getenv("KVF_TEST_SEED");
    const uint64_t s = env != nullptr ? std::strtoull(env, nullptr, 10)
                                      : (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
    std::printf("%s: seed %llu (KVF_TEST_SEED=%llu repeats this run)\n", test_name,
                static_cast<unsigned long long>(s), static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

inline protocol::KvLayout make_layout(const protocol::KvLayoutDesc& d) {
  Result<protocol::KvLayout> r = protocol::KvLayout::create(d);
  INFO(r.status().to_string());
  REQUIRE(r.ok());
  return *r;
}

inline protocol::KvLayoutDesc with_blocks(protocol::KvLayoutDesc d, uint32_t blocks) {
  d.num_blocks = blocks;
  return d;
}

// 4 layers x 37 blocks x 16 tokens x 2 heads x 64 dims x 2 bytes for FlashAttention and
// FlashInfer, MLA with one latent of 128, and dtype_bytes = 1 with odd dimensions (part_bytes 63
// or 21), so nothing is a multiple of 16.
inline std::vector<protocol::KvLayoutDesc> paged_shapes() {
  using protocol::KvLayoutKind;
  return {
      {KvLayoutKind::kFlashAttention, 4, 37, 16, 2, 64, 2},
      {KvLayoutKind::kFlashInfer, 4, 37, 16, 2, 64, 2},
      {KvLayoutKind::kMla, 4, 37, 16, 1, 128, 2},
      {KvLayoutKind::kFlashAttention, 3, 29, 3, 3, 7, 1},
      {KvLayoutKind::kFlashInfer, 3, 29, 3, 3, 7, 1},
      {KvLayoutKind::kMla, 3, 29, 3, 1, 7, 1},
  };
}

inline void randomize(std::vector<uint8_t>& v, std::mt19937_64& rng) {
  size_t i = 0;
  for (; i + 8 <= v.size(); i += 8) {
    const uint64_t r = rng();
    std::memcpy(v.data() + i, &r, 8);
  }
  for (; i < v.size(); ++i) v[i] = static_cast<uint8_t>(rng());
}

// `count` distinct block ids of a pool, in random order.
inline std::vector<uint32_t> shuffled_blocks(uint32_t pool, uint32_t count, std::mt19937_64& rng) {
  std::vector<uint32_t> ids(pool);
  std::iota(ids.begin(), ids.end(), 0u);
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(count);
  return ids;
}

}  // namespace kvf::test
