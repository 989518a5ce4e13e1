// ResidentPlanCache: copy plans uploaded once (SegmentCopier::make_resident) and found again by a
// 128-bit hash of their segments. A request's layers repeat one block mapping at other base
// addresses; seen relative to those bases the segments are identical, so every layer after the
// first is one launch with two bases and no descriptor upload. Callers make the segments relative
// in whatever way fits them (lowest source, a slot, a region's start) and pass them here.
//
// Threads: one thread at a time. A plan must outlive the launches that read it: clear() only
// once those streams have passed them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <unordered_map>

#include "kvf/gpudirect/segment_copier.h"

namespace kvf::gpudirect {

class ResidentPlanCache {
 public:
  // `copier` must outlive the cache; at most `max_plans` are kept.
  ResidentPlanCache(SegmentCopier& copier, size_t max_plans) : copier_(copier), max_plans_(max_plans) {}

  // The uploaded plan for `relative`; null when the cache is full (see full()) or the plan
  // cannot be made (too many pieces for one launch): the caller then copies the plain way.
  const ResidentSegments* find_or_make(std::span<const CopySegment> relative);
  bool full() const { return plans_.size() >= max_plans_; }
  void clear() { plans_.clear(); }

 private:
  struct Key {
    uint64_t low = 0, high = 0, count = 0;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const { return k.low ^ (k.high * 31) ^ k.count; }
  };
  SegmentCopier& copier_;
  size_t max_plans_;
  std::unordered_map<Key, ResidentSegments, KeyHash> plans_;
};

}  // namespace kvf::gpudirect
