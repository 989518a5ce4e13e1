// chunk_checksum: the definition every reader relies on (XXH3-64 up to one segment; above it the
// length-seeded XXH3-64 of the segments' XXH3-64s, little-endian), written out here independently
// of the implementation; the parallel version equal to the serial one for every length and thread
// count; and a change of one byte anywhere, or two segments swapped, changing the checksum.
#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "catch.h"
#include "kvf/store/chunk_checksum.h"

using namespace kvf::store;

namespace {

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

// The definition, from xxHash's functions alone.
uint64_t by_definition(const std::vector<uint8_t>& data) {
  const uint64_t segment = uint64_t{1} << 20;
  if (data.size() <= segment) return XXH3_64bits(data.data(), data.size());
  std::vector<uint8_t> hashes;
  for (uint64_t at = 0; at < data.size(); at += segment) {
    const uint64_t h = XXH3_64bits(data.data() + at, std::min<uint64_t>(segment, data.size() - at));
    for (int b = 0; b < 8; ++b) hashes.push_back(static_cast<uint8_t>(h >> (8 * b)));
  }
  return XXH3_64bits_withSeed(hashes.data(), hashes.size(), data.size());
}

}  // namespace

TEST_CASE("chunk_checksum follows its definition, serial and parallel alike") {
  REQUIRE(kChecksumSegmentBytes == (uint64_t{1} << 20));
  const std::vector<size_t> lengths = {0,
                                       1,
                                       4096,
                                       kChecksumSegmentBytes - 1,
                                       kChecksumSegmentBytes,
                                       kChecksumSegmentBytes + 1,
                                       3 * kChecksumSegmentBytes,
                                       5 * kChecksumSegmentBytes + 12345,
                                       size_t{32} << 20};
  for (size_t n : lengths) {
    INFO("length " << n);
    const auto data = random_bytes(n, static_cast<uint32_t>(n));
    const uint64_t expected = by_definition(data);
    CHECK(chunk_checksum(data.data(), n) == expected);
    for (size_t threads : {size_t{0}, size_t{1}, size_t{2}, size_t{3}, size_t{8}, size_t{64}}) {
      INFO("threads " << threads);
      CHECK(chunk_checksum_parallel(data.data(), n, threads) == expected);
    }
  }
}

TEST_CASE("chunk_checksum changes with any byte, and with the order of the segments") {
  const size_t n = 4 * kChecksumSegmentBytes + 100;
  auto data = random_bytes(n, 7);
  const uint64_t original = chunk_checksum_parallel(data.data(), n);
  for (size_t at :
       {size_t{0}, kChecksumSegmentBytes - 1, kChecksumSegmentBytes, 2 * kChecksumSegmentBytes + 5, n - 1}) {
    INFO("byte " << at);
    data[at] ^= 0x01;
    CHECK(chunk_checksum_parallel(data.data(), n) != original);
    CHECK(chunk_checksum(data.data(), n) != original);
    data[at] ^= 0x01;
  }
  REQUIRE(chunk_checksum(data.data(), n) == original);
  // Segments 0 and 1 swapped: every segment hash is the same, only their order differs.
  std::vector<uint8_t> swapped(data);
  std::memcpy(swapped.data(), data.data() + kChecksumSegmentBytes, kChecksumSegmentBytes);
  std::memcpy(swapped.data() + kChecksumSegmentBytes, data.data(), kChecksumSegmentBytes);
  CHECK(chunk_checksum_parallel(swapped.data(), n) != original);
  // The same segments with a shorter tail: the length is part of the hash.
  CHECK(chunk_checksum(data.data(), n - 1) != original);
}
