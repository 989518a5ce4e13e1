// EvictionPolicy: decides which chunk the store gives up when it needs space. The store tells it
// only about entries it may evict (committed, not pinned, not leased): on_insert when an entry
// becomes evictable, on_remove when it stops being so (evicted, cleared, pinned or leased), and
// on_access when an evictable entry is used. So victim() never has to skip protected entries and
// stays O(1) however many are pinned. LruPolicy is the default.
// Not synchronized: the store calls its policy under the store's mutex.
#pragma once

#include <cstddef>
#include <list>
#include <memory>
#include <optional>
#include <string_view>
#include <unordered_map>

#include "kvf/protocol/chunk_key.h"

namespace kvf::store {

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual void on_insert(const protocol::ChunkKey& key) = 0;  // key became evictable; not yet tracked
  virtual void on_access(const protocol::ChunkKey& key) = 0;  // a tracked key was used
  virtual void on_remove(const protocol::ChunkKey& key) = 0;  // a tracked key is no longer evictable
  // The tracked key to evict first, without removing it (the store calls on_remove when it evicts).
  virtual std::optional<protocol::ChunkKey> victim() const = 0;
  virtual size_t size() const = 0;  // keys tracked: the evictable entries
  virtual std::string_view name() const = 0;
};

// Least recently inserted-or-accessed first. A key that comes back after being pinned or leased
// counts as just used.
class LruPolicy final : public EvictionPolicy {
 public:
  void on_insert(const protocol::ChunkKey& key) override;
  void on_access(const protocol::ChunkKey& key) override;
  void on_remove(const protocol::ChunkKey& key) override;
  std::optional<protocol::ChunkKey> victim() const override;
  size_t size() const override { return order_.size(); }
  std::string_view name() const override { return "lru"; }

 private:
  std::list<protocol::ChunkKey> order_;  // front: most recent
  std::unordered_map<protocol::ChunkKey, std::list<protocol::ChunkKey>::iterator> where_;
};

std::unique_ptr<EvictionPolicy> make_lru_policy();

}  // namespace kvf::store
