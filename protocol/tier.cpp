#include "kvf/protocol/tier.h"

#include <string>

namespace kvf::protocol {

std::string_view tier_name(Tier tier) {
  switch (tier) {
    case Tier::kGpu:
      return "gpu";
    case Tier::kDram:
      return "dram";
    case Tier::kSsd:
      return "ssd";
  }
  return "unknown";
}

Result<Tier> parse_tier(std::string_view name) {
  for (Tier t : {Tier::kGpu, Tier::kDram, Tier::kSsd}) {
    if (tier_name(t) == name) return t;
  }
  return Status(ErrorCode::kMalformed, "unknown tier '" + std::string(name) + "' (gpu, dram or ssd)");
}

}  // namespace kvf::protocol
