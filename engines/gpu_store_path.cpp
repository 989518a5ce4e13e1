#include "gpu_store_path.h"

#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace kvf::engines {
namespace {

// The arena registrations of this process by base address, with how many pins hold each. CUDA
// allows one registration of a range per process, and several connectors (of one StoreClient)
// share its mapping. Never destroyed: a pin released during static destruction still finds it.
struct PinRegistry {
  struct Entry {
    gpudirect::PinnedRegistration registration;
    uint32_t holders = 0;
  };
  std::mutex mu;
  std::map<uint8_t*, Entry> entries;
};

PinRegistry& registry() {
  static auto* r = new PinRegistry;
  return *r;
}

}  // namespace

Result<ArenaPin> ArenaPin::acquire(uint8_t* base, uint64_t bytes) {
  if (base == nullptr || bytes == 0) {
    return Status(ErrorCode::kInvalidArgument, "the store arena is not mapped (no daemon connection yet)");
  }
  PinRegistry& r = registry();
  std::lock_guard lock(r.mu);
  auto it = r.entries.find(base);
  if (it == r.entries.end()) {
    auto registration = gpudirect::PinnedRegistration::register_range(base, bytes);
    if (!registration.ok()) {
      return Status(registration.status().code(),
                    "page-locking the store arena (" + std::to_string(bytes) +
                        " bytes) for GPU copies: " + registration.status().message() +
                        (registration.status().code() == ErrorCode::kInvalidArgument
                             ? " (is the arena already registered with CUDA elsewhere in this process?)"
                             : ""));
    }
    it = r.entries.emplace(base, PinRegistry::Entry{std::move(registration.value()), 0}).first;
  } else if (it->second.registration.size() != bytes) {
    return Status(ErrorCode::kInvalidArgument, "the store arena at this address is registered with " +
                                                   std::to_string(it->second.registration.size()) +
                                                   " bytes, not " + std::to_string(bytes));
  }
  ++it->second.holders;
  ArenaPin pin;
  pin.base_ = base;
  pin.bytes_ = bytes;
  pin.device_base_ = reinterpret_cast<uint64_t>(it->second.registration.device_pointer());
  return pin;
}

ArenaPin& ArenaPin::operator=(ArenaPin&& o) noexcept {
  if (this != &o) {
    reset();
    base_ = std::exchange(o.base_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    device_base_ = std::exchange(o.device_base_, 0);
  }
  return *this;
}

void ArenaPin::reset() {
  if (base_ == nullptr) return;
  PinRegistry& r = registry();
  std::lock_guard lock(r.mu);
  auto it = r.entries.find(base_);
  // Unregistered under the mutex, so a new registration of the same range cannot race it.
  if (it != r.entries.end() && --it->second.holders == 0) r.entries.erase(it);
  base_ = nullptr;
  bytes_ = 0;
  device_base_ = 0;
}

bool ArenaPin::contains(const uint8_t* p, uint64_t bytes) const {
  if (base_ == nullptr || p < base_) return false;
  const auto offset = static_cast<uint64_t>(p - base_);
  return offset <= bytes_ && bytes <= bytes_ - offset;
}

uint64_t ArenaPin::device_address(const uint8_t* p) const {
  return device_base_ + static_cast<uint64_t>(p - base_);
}

Result<std::unique_ptr<GpuStorePath>> GpuStorePath::create(int device, uint32_t layers) {
  std::unique_ptr<GpuStorePath> path(new GpuStorePath);
  path->device_ = device;
  auto stream = gpudirect::CudaStream::create(device);
  if (!stream.ok()) return stream.status();
  path->stream_ = std::move(stream.value());
  auto copier = gpudirect::SegmentCopier::create(device);
  if (!copier.ok()) return copier.status();
  path->copier_ = std::move(copier.value());
  for (uint32_t e = 0; e < layers + 2; ++e) {
    auto event = gpudirect::CudaEvent::create(device);
    if (!event.ok()) return event.status();
    (e < layers ? path->layer_events_ : path->chunk_events_).push_back(std::move(event.value()));
  }
  return path;
}

Status GpuStorePath::pin(std::span<uint8_t> arena, const uint8_t* p, uint64_t bytes) {
  if (pin_.contains(p, bytes)) return Status::Ok();
  // Nothing is in flight here (callers synchronize before they pin a range that is not pinned),
  // so the old registration can go before the new one is made.
  pin_.reset();
  const auto* base = arena.data();
  if (base == nullptr || p < base || static_cast<uint64_t>(p - base) > arena.size() ||
      bytes > arena.size() - static_cast<uint64_t>(p - base)) {
    return Status(ErrorCode::kPeerLost,
                  "the chunk's bytes are not in the store client's current arena (it reconnected to "
                  "another daemon)");
  }
  auto pin = ArenaPin::acquire(arena.data(), arena.size());
  if (!pin.ok()) return pin.status();
  pin_ = std::move(pin.value());
  return Status::Ok();
}

Status GpuStorePath::launch(std::span<const gpudirect::CopySegment> segments) {
  return copier_->copy(segments, stream_.handle());
}

Status GpuStorePath::launch_decode(const protocol::KvCodecParams& params, const gpudirect::PagedChunks& chunk,
                                   const uint8_t* encoded_in_arena) {
  const auto* encoded = reinterpret_cast<const void*>(device_address(encoded_in_arena));
  return gpudirect::decode_paged_chunks_cuda(params, chunk, encoded, stream_.handle());
}

Status GpuStorePath::mark_layer(uint32_t layer) {
  if (layer >= layer_events_.size()) {
    return Status(ErrorCode::kInvalidArgument, "layer " + std::to_string(layer) + " has no event");
  }
  return layer_events_[layer].record(stream_);
}

Result<bool> GpuStorePath::layer_done(uint32_t layer) const {
  if (layer >= layer_events_.size()) {
    return Status(ErrorCode::kInvalidArgument, "layer " + std::to_string(layer) + " has no event");
  }
  return layer_events_[layer].done();
}

Status GpuStorePath::wait_layer(uint32_t layer) const {
  if (layer >= layer_events_.size()) {
    return Status(ErrorCode::kInvalidArgument, "layer " + std::to_string(layer) + " has no event");
  }
  return layer_events_[layer].synchronize();
}

Status GpuStorePath::mark_chunk(uint32_t slot) {
  if (slot >= chunk_events_.size()) {
    return Status(ErrorCode::kInvalidArgument, "chunk slot " + std::to_string(slot) + " has no event");
  }
  return chunk_events_[slot].record(stream_);
}

Status GpuStorePath::wait_chunk(uint32_t slot) const {
  if (slot >= chunk_events_.size()) {
    return Status(ErrorCode::kInvalidArgument, "chunk slot " + std::to_string(slot) + " has no event");
  }
  return chunk_events_[slot].synchronize();
}

Status GpuStorePath::synchronize() const {
  return stream_.synchronize();
}

}  // namespace kvf::engines
