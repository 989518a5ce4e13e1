// range_in_one_mapping: a scan of /proc/self/maps.
#include "process_mappings.h"

#include <cinttypes>
#include <cstdio>
#include <cstring>

namespace kvf::fabric {

bool range_in_one_mapping(const void* p, uint64_t bytes) {
  if (p == nullptr || bytes == 0) return false;
  const auto first = reinterpret_cast<uintptr_t>(p);
  if (bytes - 1 > UINTPTR_MAX - first) return false;
  const uintptr_t last = first + (bytes - 1);
  std::FILE* maps = std::fopen("/proc/self/maps", "re");
  if (maps == nullptr) return false;
  bool inside = false;
  char line[512];
  bool at_line_start = true;  // a long path arrives in several pieces: only the first is a line
  // "start-end perms offset dev inode path", addresses in hex, end exclusive; sorted by address.
  while (std::fgets(line, sizeof line, maps) != nullptr) {
    const bool was_line_start = at_line_start;
    at_line_start = std::strchr(line, '\n') != nullptr;
    if (!was_line_start) continue;
    uintptr_t start = 0;
    uintptr_t end = 0;
    if (std::sscanf(line, "%" SCNxPTR "-%" SCNxPTR, &start, &end) != 2) continue;
    if (first < start) break;  // in no mapping (the lines are sorted)
    if (first < end) {
      inside = last < end;
      break;
    }
  }
  std::fclose(maps);
  return inside;
}

}  // namespace kvf::fabric
