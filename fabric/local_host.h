// Whether a host name or address names this machine (loopback, or an address of one of its
// interfaces): peers on the same host get shared-memory transports. Thread-safe, no state.
#pragma once

#include <string>

namespace kvf::fabric {

bool is_this_host(const std::string& host);

}  // namespace kvf::fabric
