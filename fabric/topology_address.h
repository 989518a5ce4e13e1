// Private to the topology loader: checks that a node address is something peers can connect to
// (an IPv4 or IPv6 literal, or a DNS host name), so "10.0.0.300" or "host name" fail at load
// time rather than at the first connect. Pure function; thread-safe.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace kvf::fabric::topo {

// Why address is not usable, or nullopt when it is.
std::optional<std::string> address_problem(std::string_view address);

}  // namespace kvf::fabric::topo
