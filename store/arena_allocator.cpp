#include "kvf/store/arena_allocator.h"

#include <string>

namespace kvf::store {

Result<ArenaAllocator> ArenaAllocator::create(uint64_t capacity, uint64_t alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    return Status(ErrorCode::kInvalidArgument,
                  "arena alignment must be a power of two, got " + std::to_string(alignment));
  }
  uint64_t usable = capacity & ~(alignment - 1);
  if (usable == 0) {
    return Status(ErrorCode::kInvalidArgument, "arena of " + std::to_string(capacity) +
                                                   " bytes holds no block of alignment " +
                                                   std::to_string(alignment));
  }
  return ArenaAllocator(usable, alignment);
}

ArenaAllocator::ArenaAllocator(uint64_t capacity, uint64_t alignment)
    : capacity_(capacity), alignment_(alignment) {
  insert_free(0, capacity);
}

void ArenaAllocator::insert_free(uint64_t offset, uint64_t length) {
  by_offset_.emplace(offset, length);
  by_size_.emplace(length, offset);
  bytes_free_ += length;
}

void ArenaAllocator::erase_free(std::map<uint64_t, uint64_t>::iterator it) {
  by_size_.erase({it->second, it->first});
  bytes_free_ -= it->second;
  by_offset_.erase(it);
}

std::optional<ArenaBlock> ArenaAllocator::allocate(uint64_t bytes) {
  if (bytes == 0 || bytes > capacity_) return std::nullopt;
  uint64_t length = round_up(bytes);
  auto fit = by_size_.lower_bound({length, 0});
  if (fit == by_size_.end()) return std::nullopt;
  auto [hole_length, hole_offset] = *fit;
  erase_free(by_offset_.find(hole_offset));
  // Split at the start: the remainder stays where it was, next to whatever follows it.
  if (hole_length > length) insert_free(hole_offset + length, hole_length - length);
  return ArenaBlock{hole_offset, length};
}

Status ArenaAllocator::free(ArenaBlock block) {
  if (block.length == 0 || block.offset % alignment_ != 0 || block.length % alignment_ != 0 ||
      block.offset > capacity_ || block.length > capacity_ - block.offset) {
    return Status(ErrorCode::kInternal, "arena free of [" + std::to_string(block.offset) + ", +" +
                                            std::to_string(block.length) + ") is not a block of this arena");
  }
  uint64_t offset = block.offset;
  uint64_t length = block.length;
  auto next = by_offset_.lower_bound(offset);
  if (next != by_offset_.end() && next->first < offset + length) {
    return Status(ErrorCode::kInternal, "arena double free at offset " + std::to_string(offset));
  }
  if (next != by_offset_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second > offset) {
      return Status(ErrorCode::kInternal, "arena double free at offset " + std::to_string(offset));
    }
    if (prev->first + prev->second == offset) {
      offset = prev->first;
      length += prev->second;
      erase_free(prev);
    }
  }
  if (next != by_offset_.end() && next->first == block.offset + block.length) {
    length += next->second;
    erase_free(next);
  }
  insert_free(offset, length);
  return Status::Ok();
}

}  // namespace kvf::store
