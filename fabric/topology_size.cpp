#include "topology_size.h"

#include <array>
#include <charconv>
#include <limits>
#include <utility>

namespace kvf::fabric::topo {

namespace {

constexpr std::array<std::pair<std::string_view, uint64_t>, 5> kUnits = {{
    {"B", 1ULL},
    {"KiB", 1ULL << 10},
    {"MiB", 1ULL << 20},
    {"GiB", 1ULL << 30},
    {"TiB", 1ULL << 40},
}};

constexpr std::array<std::string_view, 8> kAmbiguousUnits = {"K", "M", "G", "T", "KB", "MB", "GB", "TB"};

}  // namespace

std::variant<uint64_t, std::string> parse_size(std::string_view text) {
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  uint64_t count = 0;
  const auto [rest, ec] = std::from_chars(begin, end, count);
  if (ec == std::errc::result_out_of_range) return std::string("the number is too large");
  if (ec != std::errc() || rest == begin) {
    return std::string("expected a size like 64GiB, 512MiB or a byte count");
  }
  std::string_view unit(rest, static_cast<size_t>(end - rest));
  if (!unit.empty() && unit.front() == ' ') unit.remove_prefix(1);
  if (unit.empty()) return count;
  for (const auto& [name, multiplier] : kUnits) {
    if (unit != name) continue;
    if (count > std::numeric_limits<uint64_t>::max() / multiplier) {
      return std::string("the size overflows 64 bits");
    }
    return count * multiplier;
  }
  for (std::string_view ambiguous : kAmbiguousUnits) {
    if (unit == ambiguous) {
      return "unit '" + std::string(unit) +
             "' is ambiguous: use KiB, MiB, GiB or TiB (powers of 2), or a byte count";
    }
  }
  return "unknown unit '" + std::string(unit) + "': use B, KiB, MiB, GiB or TiB";
}

}  // namespace kvf::fabric::topo
