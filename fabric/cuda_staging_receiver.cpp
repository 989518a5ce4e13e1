#include "cuda_staging_receiver.h"

#include <algorithm>

#include <spdlog/spdlog.h>

namespace kvf::fabric {

StagingReceiver::StagingReceiver(int device, gpudirect::SegmentCopier& copier, WhenStreamDone when_done,
                                 uint64_t max_bytes)
    : device_(device), copier_(copier), when_done_(std::move(when_done)), max_bytes_(max_bytes) {}

StagingReceiver::~StagingReceiver() {
  // cudaFree waits for the work that uses a slot: no stream may still wait for a sender.
  for (auto& [sender, slots] : senders_) release_waits(*slots);
}

void StagingReceiver::release_waits(Slots& slots) {
  if (slots.ready == nullptr) return;
  auto stream = gpudirect::CudaStream::create(device_);
  Status s = stream.ok() ? Status::Ok() : stream.status();
  for (uint32_t i = 0; s.ok() && i < slots.slots; ++i)
    s = stream->write_value(slots.ready + i, slots.last_use[i]);
  if (s.ok()) s = stream->synchronize();
  if (!s.ok()) spdlog::warn("cuda_ipc: cannot release a staging stream's waits: {}", s.to_string());
}

void StagingReceiver::free_retired() {
  std::erase_if(retired_, [&](const std::unique_ptr<Slots>& s) {
    auto done = s->idle.done();
    if (!done.ok() || !done.value()) return false;
    allocated_ -= s->buffer.size();
    return true;
  });
}

staging::StagingOffer StagingReceiver::offer(const staging::StagingRequest& request,
                                             gpudirect::NcclComm comm) {
  staging::StagingOffer out{request.sender, 0, 0, {}, 0, {}};
  auto refuse = [&](const Status& s) {
    out.error = static_cast<uint32_t>(s.code());
    out.message = s.message();
    return out;
  };
  if (request.slot_events.empty() && !comm.valid()) {
    return refuse(Status(ErrorCode::kUnavailable,
                         "this receiver stages through GPU slots (cuda_ipc or nccl); host staging is the "
                         "ucx_staged transport's"));
  }
  free_retired();
  auto it = senders_.find(request.sender);
  if (it == senders_.end()) {
    const uint64_t slot_area = uint64_t{request.slots} * request.slot_bytes;
    // Hand-over: the ready counters follow the slots, in the same exported allocation.
    std::unique_ptr<gpudirect::CudaIpcMapping> freed;
    if (!request.handover.empty() && !comm.valid()) {
      auto mapping = gpudirect::CudaIpcMapping::open(request.handover, device_);
      if (mapping.ok() && mapping->size() >= uint64_t{request.slots} * 4) {
        freed = std::make_unique<gpudirect::CudaIpcMapping>(std::move(mapping.value()));
      } else {
        spdlog::warn("cuda_ipc: staging for sender {:016x} without GPU hand-over: {}", request.sender,
                     mapping.ok() ? "its counters are too small" : mapping.status().to_string());
      }
    }
    const uint64_t bytes = slot_area + (freed ? kCounterBytes : 0);
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
    std::vector<gpudirect::CudaEvent> filled;
    for (const std::vector<uint8_t>& handle : request.slot_events) {
      auto event = gpudirect::CudaEvent::open_ipc(handle, device_);
      if (!event.ok()) return refuse(event.status());
      filled.push_back(std::move(event.value()));
    }
    gpudirect::CudaStream receive_stream;
    std::vector<gpudirect::CudaEvent> received;
    if (comm.valid()) {
      // NCCL's receive kernel for slot k+1 and the scatter of slot k become ready together (when
      // the receive of slot k ends). Started after the scatter's blocks took the SMs, the receive
      // (and the sender's send kernel, which waits for it) would wait out the whole scatter; on a
      // high-priority stream its blocks go first.
      auto made = gpudirect::CudaStream::create(device_, gpudirect::CudaStream::Priority::kHigh);
      if (!made.ok()) return refuse(made.status());
      receive_stream = std::move(made.value());
      for (uint32_t i = 0; i < request.slots; ++i) {
        auto event = gpudirect::CudaEvent::create(device_);
        if (!event.ok()) return refuse(event.status());
        received.push_back(std::move(event.value()));
      }
    }
    if (freed) {
      uint8_t* counters = static_cast<uint8_t*>(buffer->data()) + slot_area;
      if (Status z = gpudirect::fill_device(counters, 0, kCounterBytes); !z.ok()) return refuse(z);
    }
    auto slots = std::make_unique<Slots>();
    slots->buffer = std::move(buffer.value());
    slots->stream = std::move(stream.value());
    slots->slots = request.slots;
    slots->slot_bytes = request.slot_bytes;
    slots->filled = std::move(filled);
    slots->comm = std::move(comm);
    slots->receive_stream = std::move(receive_stream);
    slots->received = std::move(received);
    if (freed) {
      slots->ready = reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(slots->buffer.data()) + slot_area);
      slots->freed = std::move(freed);
      slots->last_use.assign(request.slots, 0);
    }
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
  if (s.ready != nullptr) out.ready_offset = uint64_t{s.slots} * s.slot_bytes;
  return out;
}

Status StagingReceiver::check_destination(uint64_t destination, uint64_t bytes) {
  // A layer's pieces all lie in one allocation: the last one checked answers most of them.
  if (destination >= last_checked_.first && destination < last_checked_.second &&
      bytes <= last_checked_.second - destination) {
    return Status::Ok();
  }
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
    auto is_staging = [&](const Slots& slots) {
      return allocation->base == reinterpret_cast<uintptr_t>(slots.buffer.data());
    };
    bool staging =
        std::any_of(senders_.begin(), senders_.end(), [&](const auto& s) { return is_staging(*s.second); }) ||
        std::any_of(retired_.begin(), retired_.end(), [&](const auto& s) { return is_staging(*s); });
    if (staging) {
      return Status(ErrorCode::kInvalidArgument,
                    "destination 0x" + fmt::format("{:x}", destination) + " lies in staging memory");
    }
    known = known_allocations_.insert_or_assign(allocation->base, allocation->base + allocation->bytes).first;
    ++known;
  }
  const uintptr_t end = std::prev(known)->second;
  if (destination + bytes > end) {
    return Status(ErrorCode::kInvalidArgument, "destination 0x" + fmt::format("{:x}", destination) + " + " +
                                                   std::to_string(bytes) + " bytes runs past its allocation");
  }
  last_checked_ = *std::prev(known);
  return Status::Ok();
}

void StagingReceiver::scatter(const staging::Scatter& request,
                              std::function<void(staging::Scattered)> reply) {
  staging::Scattered out{request.sender, request.batch, request.slot, 0, {}};
  std::function<void(const Status&)> fail = [&](const Status& st) {
    out.error = static_cast<uint32_t>(st.code());
    out.message = st.message();
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
  const uint64_t slot_base = reinterpret_cast<uint64_t>(s.buffer.data()) + request.slot * s.slot_bytes;
  if (!request.sends.empty() && !s.comm.valid()) {
    return fail(
        Status(ErrorCode::kInvalidArgument, "a scatter in NCCL sends, but these slots are not NCCL's"));
  }
  if (request.use != 0 && s.ready == nullptr) {
    return fail(Status(ErrorCode::kInvalidArgument, "a hand-over scatter, but no hand-over was offered"));
  }
  // With hand-over: the sender's counter this scatter sets once done, else null.
  uint32_t* const freed = request.use != 0 ? static_cast<uint32_t*>(s.freed->data()) + request.slot : nullptr;
  if (freed != nullptr) {
    // The sender's copy stream sets ready to this use once the slot is full. From here on the
    // slot must go back to the sender even when the scatter is refused, or its stream would wait
    // for it forever: a refusal still hands the slot back, in stream order.
    s.last_use[request.slot] = request.use;
    if (Status c = s.stream.wait_value(s.ready + request.slot, request.use); !c.ok()) return fail(c);
    fail = [&, freed](const Status& st) {
      if (Status w = s.stream.write_value(freed, request.use); !w.ok())
        spdlog::error("cuda_ipc: cannot hand slot {} back to its sender: {}", request.slot, w.to_string());
      out.error = static_cast<uint32_t>(st.code());
      out.message = st.message();
      reply(std::move(out));
    };
  } else if (s.comm.valid()) {
    // Over NCCL the sender's send is already queued: receive it before anything can refuse the
    // scatter, or the sender's stream would wait for this receive forever.
    uint64_t total = 0;
    for (const staging::ScatterPiece& piece : request.pieces) total += piece.bytes;
    if (total > s.slot_bytes) {
      return fail(Status(ErrorCode::kInvalidArgument, "the scatter names more bytes than a slot holds"));
    }
    // The sender's sends: one of the whole slot, or (straight from its blocks) one per run.
    const uint64_t one[] = {total};
    const std::span<const uint64_t> sizes =
        request.sends.empty() ? std::span<const uint64_t>(one) : request.sends;
    if (Status c = s.comm.recv(reinterpret_cast<void*>(slot_base), sizes, s.receive_stream.handle()); !c.ok())
      return fail(c);
    if (Status c = s.received[request.slot].record(s.receive_stream); !c.ok()) return fail(c);
    if (Status c = s.stream.wait_event(s.received[request.slot].handle()); !c.ok()) return fail(c);
  } else {
    // The sender's copy into the slot was enqueued before it sent this; the GPU waits for its end.
    if (Status c = s.stream.wait_event(s.filled[request.slot].handle()); !c.ok()) return fail(c);
  }
  segments_.clear();
  uint64_t offset = 0;
  for (const staging::ScatterPiece& piece : request.pieces) {
    if (piece.bytes > s.slot_bytes - offset) {
      return fail(Status(ErrorCode::kInvalidArgument, "the scatter names more bytes than a slot holds (" +
                                                          std::to_string(s.slot_bytes) + ")"));
    }
    if (Status c = check_destination(piece.destination, piece.bytes); !c.ok()) return fail(c);
    segments_.push_back(gpudirect::CopySegment{slot_base + offset, piece.destination, piece.bytes});
    offset += piece.bytes;
  }
  if (const gpudirect::ResidentSegments* plan = plan_for(slot_base); plan != nullptr) {
    if (Status c = copier_.copy_resident(*plan, slot_base, plan_dst_base_, s.stream.handle()); !c.ok())
      return fail(c);
  } else if (Status c = copier_.copy(segments_, s.stream.handle()); !c.ok()) {
    return fail(c);
  }
  if (freed != nullptr) {
    if (Status c = s.stream.write_value(freed, request.use); !c.ok()) return fail(c);
  }
  when_done_(s.stream, [out = std::move(out), reply = std::move(reply)](const Status& st) mutable {
    if (!st.ok()) {
      out.error = static_cast<uint32_t>(st.code());
      out.message = st.message();
    }
    reply(std::move(out));
  });
}

const gpudirect::ResidentSegments* StagingReceiver::plan_for(uint64_t slot_base) {
  // Layers of a request repeat one block mapping at other destinations: relative to the slot and
  // to their lowest destination, their pieces are the same, so the plan is uploaded once.
  if (segments_.size() < 16) return nullptr;
  uint64_t dst_base = UINT64_MAX;
  for (const gpudirect::CopySegment& seg : segments_) dst_base = std::min(dst_base, seg.dst);
  relative_.clear();
  for (const gpudirect::CopySegment& seg : segments_)
    relative_.push_back({seg.src - slot_base, seg.dst - dst_base, seg.bytes});
  plan_dst_base_ = dst_base;
  return plans_.find_or_make(relative_);  // full: the plain way (plans go only with this object)
}

gpudirect::NcclComm StagingReceiver::drop(uint64_t sender) {
  auto it = senders_.find(sender);
  if (it == senders_.end()) return {};
  std::unique_ptr<Slots> slots = std::move(it->second);
  senders_.erase(it);
  // The caller closes it; closing (or, for a dead sender, aborting) also ends any receive still
  // queued, so the stream drains and the slots below get freed.
  gpudirect::NcclComm comm = std::move(slots->comm);
  release_waits(*slots);  // a sender gone mid-stream never fills the slots its scatters wait for
  auto idle = gpudirect::CudaEvent::create(device_);
  if (idle.ok() && idle->record(slots->stream).ok()) {
    slots->idle = std::move(idle.value());
    retired_.push_back(std::move(slots));
  } else {
    comm.abort();  // nothing to wait on: end any queued receive now, then let cudaFree wait
    allocated_ -= slots->buffer.size();
  }
  free_retired();
  return comm;
}

}  // namespace kvf::fabric
