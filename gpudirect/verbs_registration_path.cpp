// The names of the verbs registration paths, the same with and without libibverbs.
#include "kvf/gpudirect/verbs_registration.h"

namespace kvf::gpudirect {

std::string_view registration_path_name(VerbsRegistrationPath path) {
  switch (path) {
    case VerbsRegistrationPath::kHost:
      return "host";
    case VerbsRegistrationPath::kDmaBuf:
      return "dma-buf";
    case VerbsRegistrationPath::kPeerMem:
      return "nvidia-peermem";
  }
  return "unknown";
}

}  // namespace kvf::gpudirect
