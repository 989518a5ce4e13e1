#include "cuda_staging_receiver.h"

#include <spdlog/spdlog.h>

namespace kvf::fabric {

StagingReceiver::StagingReceiver(int device, gpudirect::SegmentCopier& copier, WhenStreamDone when_done,
                                 uint64_t max_bytes)
    : device_(device), copier_(copier), when_done_(std::move(when_done)), max_bytes_(max_bytes) {}

StagingReceiver::~StagingReceiver() {
  // A scatter may still read a slot.
  for (auto& [sender, slots] : senders_) (void)slots->stream.synchronize();
}

staging::StagingOffer StagingReceiver::offer(const staging::StagingRequest& request) {
  staging::StagingOffer out{request.sender, 0, 0, {}, 0, {}};
  auto refuse = [&](const Status& s) {
    out.error = static_cast<uint32_t>(s.code());
    out.message = s.message();
    return out;
  };
  auto it = senders_.find(request.sender);
  if (it == senders_.end()) {
    const uint64_t bytes = uint64_t{request.slots} * request.slot_bytes;
    if (allocated_ + bytes > max_bytes_) {
      return refuse(Status(ErrorCode::kOutOfMemory, "staging " + std::to_string(bytes >> 20) +
                                                        " MiB would pass this receiver's limit of " +
                                                        std::to_string(max_bytes_ >> 20) + " MiB (" +
                                                        std::to_string(allocated_ >> 20) + " MiB in use)"));
    }
    auto buffer = gpudirect::DeviceBuffer::allocate(device_, bytes);
    if (!buffer.ok()) return refuse(buffer.status());
    auto stream = gpudirect::CudaStream::create(device_);
    if (!stream.ok()) return refuse(stream.status());
    auto slots = std::make_unique<Slots>(
        Slots{std::move(buffer.value()), std::move(stream.value()), request.slots, request.slot_bytes});
    allocated_ += bytes;
    it = senders_.emplace(request.sender, std::move(slots)).first;
    spdlog::info("cuda_ipc: staging {} slots of {} MiB on GPU {} for sender {:016x}", request.slots,
                 request.slot_bytes >> 20, device_, request.sender);
  }
  Slots& s = *it->second;
  auto blob = gpudirect::export_cuda_ipc(s.buffer.data(), s.buffer.size());
  if (!blob.ok()) return refuse(blob.status());
  out.slots = s.slots;
  out.slot_bytes = s.slot_bytes;
  out.cuda_ipc = std::move(blob.value());
  return out;
}

Status StagingReceiver::check_destination(uint64_t destination, uint64_t bytes) {
  auto known = known_allocations_.upper_bound(destination);
  if (known == known_allocations_.begin() || std::prev(known)->second < destination ||
      std::prev(known)->second - destination < bytes) {
    auto allocation = gpudirect::device_allocation_of(reinterpret_cast<const void*>(destination));
    if (!allocation.ok()) {
      return Status(ErrorCode::kInvalidArgument, "destination 0x" + fmt::format("{:x}", destination) +
                                                     " is not this GPU's device memory (" +
                                                     allocation.status().message() + ")");
    }
    if (allocation->device != device_) {
      return Status(ErrorCode::kInvalidArgument, "destination 0x" + fmt::format("{:x}", destination) +
                                                     " is on GPU " + std::to_string(allocation->device) +
                                                     ", this receiver's is GPU " + std::to_string(device_));
    }
    for (const auto& [sender, slots] : senders_) {
      if (allocation->base == reinterpret_cast<uintptr_t>(slots->buffer.data())) {
        return Status(ErrorCode::kInvalidArgument,
                      "destination 0x" + fmt::format("{:x}", destination) + " lies in staging memory");
      }
    }
    known = known_allocations_.insert_or_assign(allocation->base, allocation->base + allocation->bytes).first;
    ++known;
  }
  const uintptr_t end = std::prev(known)->second;
  if (destination + bytes > end) {
    return Status(ErrorCode::kInvalidArgument, "destination 0x" + fmt::format("{:x}", destination) + " + " +
                                                   std::to_string(bytes) + " bytes runs past its allocation");
  }
  return Status::Ok();
}

void StagingReceiver::scatter(const staging::Scatter& request,
                              std::function<void(staging::Scattered)> reply) {
  staging::Scattered out{request.sender, request.batch, request.slot, 0, {}};
  auto fail = [&](const Status& s) {
    out.error = static_cast<uint32_t>(s.code());
    out.message = s.message();
    reply(std::move(out));
  };
  auto it = senders_.find(request.sender);
  if (it == senders_.end())
    return fail(Status(ErrorCode::kNotFound, "no staging was offered to this sender"));
  Slots& s = *it->second;
  if (request.slot >= s.slots) {
    return fail(Status(ErrorCode::kInvalidArgument,
                       "slot " + std::to_string(request.slot) + " of " + std::to_string(s.slots)));
  }
  segments_.clear();
  uint64_t offset = 0;
  const uint64_t slot_base = reinterpret_cast<uint64_t>(s.buffer.data()) + request.slot * s.slot_bytes;
  for (const staging::ScatterPiece& piece : request.pieces) {
    if (piece.bytes > s.slot_bytes - offset) {
      return fail(Status(ErrorCode::kInvalidArgument, "the scatter names more bytes than a slot holds (" +
                                                          std::to_string(s.slot_bytes) + ")"));
    }
    if (Status c = check_destination(piece.destination, piece.bytes); !c.ok()) return fail(c);
    segments_.push_back(gpudirect::CopySegment{slot_base + offset, piece.destination, piece.bytes});
    offset += piece.bytes;
  }
  if (Status c = copier_.copy(segments_, s.stream.handle()); !c.ok()) return fail(c);
  when_done_(s.stream, [out = std::move(out), reply = std::move(reply)](const Status& st) mutable {
    if (!st.ok()) {
      out.error = static_cast<uint32_t>(st.code());
      out.message = st.message();
    }
    reply(std::move(out));
  });
}

void StagingReceiver::drop(uint64_t sender) {
  auto it = senders_.find(sender);
  if (it == senders_.end()) return;
  (void)it->second->stream.synchronize();
  allocated_ -= it->second->buffer.size();
  senders_.erase(it);
}

}  // namespace kvf::fabric
