// Private to the topology loader: parses store sizes ("64GiB", "512 MiB", "1073741824").
// Only binary units are accepted: "GB" is ambiguous (10^9 or 2^30?) and is refused with a hint.
// Pure function; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>

namespace kvf::fabric::topo {

// The byte count, or why the text is not a size.
std::variant<uint64_t, std::string> parse_size(std::string_view text);

}  // namespace kvf::fabric::topo
