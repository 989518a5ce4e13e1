// Built instead of verbs/verbs_registration.cpp when libibverbs was not found: every factory says
// why it cannot, and no object can exist, so the resets have nothing to release.
#include "kvf/gpudirect/verbs_registration.h"

#include <string>

namespace kvf::gpudirect {
namespace {

Status built_without_verbs(const std::string& what) {
  return Status(ErrorCode::kUnavailable, what + ": kvfabric was built without libibverbs");
}

}  // namespace

Result<VerbsDevice> VerbsDevice::open_first() {
  return built_without_verbs("VerbsDevice::open_first");
}

Result<VerbsDevice> VerbsDevice::open(std::string_view) {
  return built_without_verbs("VerbsDevice::open");
}

Result<VerbsDevice> VerbsDevice::open_matching(std::string_view) {
  return built_without_verbs("VerbsDevice::open");
}

void VerbsDevice::reset() {}

Result<VerbsMemoryRegion> VerbsMemoryRegion::register_host(ibv_pd*, void*, uint64_t) {
  return built_without_verbs("VerbsMemoryRegion::register_host");
}

Result<VerbsMemoryRegion> VerbsMemoryRegion::register_cuda(ibv_pd*, void*, uint64_t) {
  return built_without_verbs("VerbsMemoryRegion::register_cuda");
}

uint32_t VerbsMemoryRegion::lkey() const {
  return 0;
}

uint32_t VerbsMemoryRegion::rkey() const {
  return 0;
}

void VerbsMemoryRegion::reset() {}

}  // namespace kvf::gpudirect
