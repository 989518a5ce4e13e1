// Tier: where a stored prefix lives, fastest first, and its name on the wire ("gpu", "dram",
// "ssd"). Shared by the daemon's control API and the routers' client so the two cannot drift.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvf/protocol/status.h"

namespace kvf::protocol {

enum class Tier : uint8_t {
  kGpu = 0,   // in an engine's GPU blocks
  kDram = 1,  // in the node's CPU-memory store
  kSsd = 2,   // in the node's SSD tier
};

std::string_view tier_name(Tier tier);  // "gpu", "dram", "ssd"
// kMalformed for a name that is none of the above.
Result<Tier> parse_tier(std::string_view name);

}  // namespace kvf::protocol
