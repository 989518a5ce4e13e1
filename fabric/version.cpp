#include "kvf/fabric/version.h"

namespace kvf::fabric {
std::string_view version() {
  return "0.1.0";
}
}  // namespace kvf::fabric
