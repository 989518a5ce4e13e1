// Questions about this process's own virtual memory map (/proc/self/maps).
#pragma once

#include <cstdint>

namespace kvf::fabric {

// Whether [p, p + bytes) lies inside one mapping of this process (one line of /proc/self/maps).
// For a peer's shared-memory segment mapped here, it tells whether a range the peer described
// really lies inside the segment: UCX maps segments without saying how long they are. Reads the
// file (milliseconds for a big process): call it when a region is imported, not per put. False
// when the file cannot be read. Any thread.
bool range_in_one_mapping(const void* p, uint64_t bytes);

}  // namespace kvf::fabric
