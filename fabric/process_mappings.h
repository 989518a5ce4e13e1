// Questions about this process's own virtual memory map (/proc/self/maps).
#pragma once

#include <cstdint>
#include <optional>

namespace kvf::fabric {

// One mapping of this process: [start, end).
struct MappingBounds {
  uintptr_t start = 0;
  uintptr_t end = 0;
  // Whether [p, p + bytes) lies inside this mapping.
  bool holds(const void* p, uint64_t bytes) const {
    const auto first = reinterpret_cast<uintptr_t>(p);
    return bytes > 0 && first >= start && first < end && bytes <= end - first;
  }
};

// The mapping (one line of /proc/self/maps) that holds address p, if any. For a peer's
// shared-memory segment mapped here, it tells how far the segment goes, which UCX does not say.
// Reads the file (tens of microseconds, more in a big process): look it up once per segment, not
// per region or put. Nothing when p is in no mapping or the file cannot be read. Any thread.
std::optional<MappingBounds> mapping_containing(const void* p);

}  // namespace kvf::fabric
