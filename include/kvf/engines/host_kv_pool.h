// HostKvPool: host memory for a paged KV cache, one heap buffer per layer, for tests and tools that
// run the reference engine without an engine's own allocator. Move-only; the buffers stay where
// they are when the pool moves, so views taken earlier stay valid. Thread rules: as KvCacheView.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "kvf/engines/kv_cache_view.h"
#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"

namespace kvf::engines {

class HostKvPool {
 public:
  // Every byte set to `fill`: 0xFF poisons (bf16 0xFFFF is a NaN, so a read of a slot nobody wrote
  // shows in the results). kOutOfMemory when the buffers cannot be allocated.
  static Result<HostKvPool> create(const protocol::KvLayoutDesc& desc, uint8_t fill = 0);

  HostKvPool(HostKvPool&&) = default;
  HostKvPool& operator=(HostKvPool&&) = default;
  HostKvPool(const HostKvPool&) = delete;
  HostKvPool& operator=(const HostKvPool&) = delete;

  const protocol::KvLayout& layout() const { return layout_; }
  uint8_t* layer(uint32_t index) { return buffers_[index].data(); }
  KvCacheView view();

 private:
  explicit HostKvPool(protocol::KvLayout layout) : layout_(std::move(layout)) {}

  protocol::KvLayout layout_;
  std::vector<std::vector<uint8_t>> buffers_;
};

}  // namespace kvf::engines
