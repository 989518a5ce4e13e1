// ArenaAllocator: hands out aligned byte ranges of a fixed-size arena (the store's shared-memory
// region) by offset, so every process that maps the arena agrees on where a chunk lives.
//
// Why best fit with coalescing and not size-class slabs: a node's store holds chunks of several
// models whose chunk sizes differ (and are not known when the arena is created), and slabs would
// strand memory in classes a model no longer uses. Free ranges are kept twice, by offset (to merge
// a freed range with its free neighbours at once) and by (length, offset) (to find the smallest
// range that fits in O(log n)). Fragmentation: with one chunk size every hole is a multiple of
// that size, so nothing is ever lost; with mixed sizes a request can fail while enough bytes are
// free in smaller holes, and the store then evicts more entries (in LRU order) until neighbours
// coalesce into a hole that fits. Lengths are rounded up to `alignment`.
// Not synchronized: its owner (ChunkStore) calls it under its own mutex.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <utility>

#include "kvf/protocol/status.h"

namespace kvf::store {

struct ArenaBlock {
  uint64_t offset = 0;
  uint64_t length = 0;  // a multiple of the allocator's alignment
  bool operator==(const ArenaBlock&) const = default;
};

class ArenaAllocator {
 public:
  // `alignment` must be a power of two; the usable capacity is `capacity` rounded down to it.
  static Result<ArenaAllocator> create(uint64_t capacity, uint64_t alignment);

  // The smallest free range that holds `bytes` rounded up to the alignment, split off at its
  // start; nullopt when no free range is large enough (or bytes is 0).
  std::optional<ArenaBlock> allocate(uint64_t bytes);
  // Returns a block from allocate(). A block that lies outside the arena or overlaps free space
  // (a double free) is refused with kInternal and changes nothing.
  Status free(ArenaBlock block);

  uint64_t round_up(uint64_t bytes) const { return (bytes + alignment_ - 1) & ~(alignment_ - 1); }
  uint64_t capacity() const { return capacity_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t bytes_free() const { return bytes_free_; }
  uint64_t bytes_used() const { return capacity_ - bytes_free_; }
  uint64_t largest_free() const { return by_size_.empty() ? 0 : by_size_.rbegin()->first; }
  size_t free_ranges() const { return by_offset_.size(); }

 private:
  ArenaAllocator(uint64_t capacity, uint64_t alignment);
  void insert_free(uint64_t offset, uint64_t length);
  void erase_free(std::map<uint64_t, uint64_t>::iterator it);

  uint64_t capacity_ = 0;
  uint64_t alignment_ = 0;
  uint64_t bytes_free_ = 0;
  std::map<uint64_t, uint64_t> by_offset_;           // offset -> length
  std::set<std::pair<uint64_t, uint64_t>> by_size_;  // (length, offset)
};

}  // namespace kvf::store
