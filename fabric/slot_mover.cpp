#include "slot_mover.h"

#include <string>

#include "kvf/gpudirect/memory_region.h"

namespace kvf::fabric {

Result<std::unique_ptr<SlotMover>> SlotMover::create(int device) {
  std::unique_ptr<SlotMover> mover(new SlotMover(device));
  if (device < 0) return mover;
  auto copier = gpudirect::SegmentCopier::create(device, 1u << 16, 4);
  if (!copier.ok()) return copier.status();
  auto stream = gpudirect::CudaStream::create(device);
  if (!stream.ok()) return stream.status();
  mover->copier_ = std::move(copier.value());
  mover->stream_ = std::move(stream.value());
  return mover;
}

SlotMover::~SlotMover() {
  // Nothing may still read or write a slot whose registration goes away.
  if (on_gpu()) (void)stream_.synchronize();
}

Status SlotMover::pin(void* p, uint64_t bytes) {
  if (!on_gpu()) return Status::Ok();
  auto pinned = gpudirect::PinnedRegistration::register_range(p, bytes);
  if (!pinned.ok()) return pinned.status();
  if (pinned->device_pointer() != p) {
    // The segment lists carry host addresses; a GPU that needs other ones (no unified addressing)
    // is not one this transport runs on.
    return Status(ErrorCode::kUnavailable,
                  "pinned staging slots have another address on the GPU (no unified "
                  "virtual addressing): the ucx_staged transport cannot run here");
  }
  pinned_.push_back(std::move(pinned.value()));
  return Status::Ok();
}

Status SlotMover::check_kv_memory(const void* p, uint64_t bytes) const {
  if (!on_gpu()) {
    if (gpudirect::MemoryRegion::registered_range(p, bytes)) return Status::Ok();
    return Status(ErrorCode::kInvalidArgument, std::to_string(bytes) + " bytes at " +
                                                   std::to_string(reinterpret_cast<uintptr_t>(p)) +
                                                   " are not host memory this process registered for peers");
  }
  auto allocation = gpudirect::device_allocation_of(p);
  if (!allocation.ok()) return Status(ErrorCode::kInvalidArgument, allocation.status().message());
  const auto at = reinterpret_cast<uintptr_t>(p);
  if (allocation->device != device_ || at - allocation->base > allocation->bytes ||
      bytes > allocation->bytes - (at - allocation->base)) {
    return Status(ErrorCode::kInvalidArgument, std::to_string(bytes) + " bytes at " + std::to_string(at) +
                                                   " do not lie in one allocation of GPU " +
                                                   std::to_string(device_));
  }
  return Status::Ok();
}

void SlotMover::copy(std::vector<gpudirect::CopySegment> segments, Done done) {
  if (!on_gpu()) {
    gpudirect::copy_segments_cpu(segments);
    return done(Status::Ok());
  }
  if (Status s = copier_->copy(segments, stream_.handle()); !s.ok()) return done(s);
  auto event = gpudirect::CudaEvent::create(device_);
  if (!event.ok()) return done(event.status());
  if (Status s = event->record(stream_); !s.ok()) return done(s);
  pending_.push_back(Pending{std::move(event.value()), std::move(done)});
}

bool SlotMover::poll() {
  while (!pending_.empty()) {
    auto finished = pending_.front().event.done();
    if (finished.ok() && !finished.value()) break;
    Pending p = std::move(pending_.front());
    pending_.pop_front();
    p.done(finished.ok() ? Status::Ok() : finished.status());
  }
  return !pending_.empty();
}

}  // namespace kvf::fabric
