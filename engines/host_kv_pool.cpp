#include "kvf/engines/host_kv_pool.h"

#include <new>
#include <stdexcept>
#include <string>

namespace kvf::engines {

Result<HostKvPool> HostKvPool::create(const protocol::KvLayoutDesc& desc, uint8_t fill) {
  auto layout = protocol::KvLayout::create(desc);
  if (!layout.ok()) return layout.status();
  HostKvPool pool(std::move(layout.value()));
  try {
    pool.buffers_.reserve(desc.num_layers);
    for (uint32_t l = 0; l < desc.num_layers; ++l)
      pool.buffers_.emplace_back(pool.layout_.layer_bytes(), fill);
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::kOutOfMemory, "KV pool of " + std::to_string(desc.num_layers) + " layers x " +
                                               std::to_string(pool.layout_.layer_bytes()) + " bytes");
  } catch (const std::length_error&) {
    return Status(ErrorCode::kOutOfMemory, "KV pool layer of " + std::to_string(pool.layout_.layer_bytes()) +
                                               " bytes exceeds what a vector holds");
  }
  return pool;
}

KvCacheView HostKvPool::view() {
  KvCacheView v{layout_, {}};
  v.layers.reserve(buffers_.size());
  for (auto& b : buffers_) v.layers.push_back(b.data());
  return v;
}

}  // namespace kvf::engines
