// SegmentCopier in a build without CUDA: create() says so, so callers fall back to
// copy_segments_cpu; the rest only exists to link (no copier can be made).
#include "kvf/gpudirect/segment_copier.h"

#include <string>

namespace kvf::gpudirect {

struct SegmentCopier::Impl {
  int device = 0;
  uint32_t max_segments = 0;
};

SegmentCopier::SegmentCopier(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SegmentCopier::~SegmentCopier() = default;

Result<std::unique_ptr<SegmentCopier>> SegmentCopier::create(int device, uint32_t, uint32_t) {
  return Status(ErrorCode::kUnavailable, "SegmentCopier for CUDA device " + std::to_string(device) +
                                             ": kvfabric was built without CUDA (nvcc not found)");
}

Status SegmentCopier::copy(std::span<const CopySegment>, void*) {
  return Status(ErrorCode::kUnavailable, "kvfabric was built without CUDA");
}

Status SegmentCopier::copy_with_copy_engines(std::span<const CopySegment>, void*, bool) {
  return Status(ErrorCode::kUnavailable, "kvfabric was built without CUDA");
}

void ResidentSegments::reset() {}  // never holds device memory without CUDA

Result<ResidentSegments> SegmentCopier::make_resident(std::span<const CopySegment>) {
  return Status(ErrorCode::kUnavailable, "kvfabric was built without CUDA");
}

Status SegmentCopier::copy_resident(const ResidentSegments&, uint64_t, uint64_t, void*) {
  return Status(ErrorCode::kUnavailable, "kvfabric was built without CUDA");
}

Status SegmentCopier::set_kernel_shape(const KernelShape&) {
  return Status(ErrorCode::kUnavailable, "built without CUDA");
}
KernelShape SegmentCopier::kernel_shape() const {
  return {};
}

int SegmentCopier::device() const {
  return impl_->device;
}
int SegmentCopier::multiprocessors() const {
  return 0;
}
uint32_t SegmentCopier::max_segments_per_launch() const {
  return impl_->max_segments;
}
uint64_t SegmentCopier::kernel_launches() const {
  return 0;
}

}  // namespace kvf::gpudirect
