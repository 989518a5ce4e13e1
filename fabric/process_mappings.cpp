// mapping_containing: a scan of /proc/self/maps.
#include "process_mappings.h"

#include <cinttypes>
#include <cstdio>
#include <cstring>

namespace kvf::fabric {

std::optional<MappingBounds> mapping_containing(const void* p) {
  if (p == nullptr) return std::nullopt;
  const auto address = reinterpret_cast<uintptr_t>(p);
  std::FILE* maps = std::fopen("/proc/self/maps", "re");
  if (maps == nullptr) return std::nullopt;
  std::optional<MappingBounds> found;
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
    if (address < start) break;  // in no mapping (the lines are sorted)
    if (address < end) {
      found = MappingBounds{start, end};
      break;
    }
  }
  std::fclose(maps);
  return found;
}

}  // namespace kvf::fabric
