// Private to the topology loader: "did you mean ...?" for mistyped keys, so a typo is reported
// with its fix instead of only as unknown. Pure functions; thread-safe.
#pragma once

#include <optional>
#include <string_view>
#include <vector>

namespace kvf::fabric::topo {

// Case-insensitive Levenshtein distance.
size_t edit_distance(std::string_view a, std::string_view b);

// The candidate closest to word when it is close enough to be a plausible typo.
std::optional<std::string_view> closest_match(std::string_view word,
                                              const std::vector<std::string_view>& candidates);

}  // namespace kvf::fabric::topo
