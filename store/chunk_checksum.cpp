#include "kvf/store/chunk_checksum.h"

#include <xxhash.h>

#include <algorithm>
#include <vector>

#include "kvf/store/parallel_for.h"

namespace kvf::store {

namespace {

uint64_t segments_of(uint64_t length) {
  return (length + kChecksumSegmentBytes - 1) / kChecksumSegmentBytes;
}

uint64_t segment_hash(const uint8_t* data, uint64_t length, uint64_t segment) {
  const uint64_t at = segment * kChecksumSegmentBytes;
  const uint64_t bytes = std::min(kChecksumSegmentBytes, length - at);
  return XXH3_64bits(data + at, bytes);
}

// The final hash over the segments' hashes, as little-endian bytes whatever the host's order.
uint64_t combine(std::vector<uint64_t>& hashes, uint64_t length) {
  std::vector<uint8_t> le(hashes.size() * 8);
  for (size_t i = 0; i < hashes.size(); ++i)
    for (size_t b = 0; b < 8; ++b) le[i * 8 + b] = static_cast<uint8_t>(hashes[i] >> (8 * b));
  return XXH3_64bits_withSeed(le.data(), le.size(), length);
}

}  // namespace

uint64_t chunk_checksum(const uint8_t* data, uint64_t length) {
  if (length <= kChecksumSegmentBytes) return XXH3_64bits(data, length);
  std::vector<uint64_t> hashes(segments_of(length));
  for (uint64_t s = 0; s < hashes.size(); ++s) hashes[s] = segment_hash(data, length, s);
  return combine(hashes, length);
}

uint64_t chunk_checksum_parallel(const uint8_t* data, uint64_t length, size_t threads) {
  if (length <= kChecksumSegmentBytes) return XXH3_64bits(data, length);
  std::vector<uint64_t> hashes(segments_of(length));
  parallel_for(
      hashes.size(), [&](size_t s) { hashes[s] = segment_hash(data, length, s); },
      threads == 0 ? default_parallel_threads() : threads);
  return combine(hashes, length);
}

}  // namespace kvf::store
