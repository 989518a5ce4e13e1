#include "kvf/store/eviction_policy.h"

namespace kvf::store {

void LruPolicy::on_insert(const protocol::ChunkKey& key) {
  auto [it, inserted] = where_.try_emplace(key);
  if (!inserted) {  // tolerated so a policy misuse cannot corrupt the order: treat as an access
    order_.splice(order_.begin(), order_, it->second);
    return;
  }
  order_.push_front(key);
  it->second = order_.begin();
}

void LruPolicy::on_access(const protocol::ChunkKey& key) {
  auto it = where_.find(key);
  if (it != where_.end() && it->second != order_.begin()) order_.splice(order_.begin(), order_, it->second);
}

void LruPolicy::on_remove(const protocol::ChunkKey& key) {
  auto it = where_.find(key);
  if (it == where_.end()) return;
  order_.erase(it->second);
  where_.erase(it);
}

std::optional<protocol::ChunkKey> LruPolicy::victim() const {
  if (order_.empty()) return std::nullopt;
  return order_.back();
}

std::unique_ptr<EvictionPolicy> make_lru_policy() {
  return std::make_unique<LruPolicy>();
}

}  // namespace kvf::store
