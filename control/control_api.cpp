// Names of the ControlApi's enums as they appear on the wire.
#include "kvf/control/control_api.h"

namespace kvf::control {

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

}  // namespace kvf::control
