#include "kvf/gpudirect/resident_plan_cache.h"

#include <xxhash.h>

namespace kvf::gpudirect {

const ResidentSegments* ResidentPlanCache::find_or_make(std::span<const CopySegment> relative) {
  const XXH128_hash_t h = XXH3_128bits(relative.data(), relative.size_bytes());
  const Key key{h.low64, h.high64, relative.size()};
  auto it = plans_.find(key);
  if (it != plans_.end()) return &it->second;
  if (full()) return nullptr;
  auto made = copier_.make_resident(relative);
  if (!made.ok()) return nullptr;
  return &plans_.emplace(key, std::move(made.value())).first->second;
}

}  // namespace kvf::gpudirect
