// BlockManager: a reference engine's free KV blocks, handed out shuffled (as a real engine's
// allocator ends up after a while), so that nothing in the fabric can depend on a request's blocks
// being in order. Thread rules: every method may be called from any thread (one mutex).
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <numeric>
#include <random>
#include <vector>

namespace kvf::engines {

class BlockManager {
 public:
  explicit BlockManager(uint32_t blocks) : free_(blocks) {
    std::iota(free_.begin(), free_.end(), 0u);
    std::shuffle(free_.begin(), free_.end(), std::mt19937(11));
  }
  // n distinct free blocks, or none when fewer than n are free.
  std::vector<uint32_t> allocate(uint32_t n) {
    std::lock_guard lock(mutex_);
    if (n > free_.size()) return {};
    std::vector<uint32_t> out(free_.end() - n, free_.end());
    free_.resize(free_.size() - n);
    return out;
  }
  void release(const std::vector<uint32_t>& blocks) {
    std::lock_guard lock(mutex_);
    free_.insert(free_.end(), blocks.begin(), blocks.end());
  }
  size_t free_blocks() const {
    std::lock_guard lock(mutex_);
    return free_.size();
  }

 private:
  mutable std::mutex mutex_;
  std::vector<uint32_t> free_;
};

}  // namespace kvf::engines
