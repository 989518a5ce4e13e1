// kvfabric's version string, for --version and the handshake logs.
#pragma once

#include <string_view>

namespace kvf::fabric {
std::string_view version();
}  // namespace kvf::fabric
