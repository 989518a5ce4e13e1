#include "slot_mover.h"

#include <string>

#include "kvf/gpudirect/kv_codec.h"
#include "kvf/gpudirect/memory_region.h"

namespace kvf::fabric {

Result<std::unique_ptr<SlotMover>> SlotMover::create(int device, uint32_t workers, Post post) {
  std::unique_ptr<SlotMover> mover(new SlotMover(device));
  if (device < 0) {
    if (workers > 0 && !post) return Status(ErrorCode::kInvalidArgument, "slot mover: workers need a post");
    mover->post_ = std::move(post);
    for (uint32_t i = 0; i < workers; ++i) mover->workers_.emplace_back([m = mover.get()] { m->work(); });
    return mover;
  }
  auto copier = gpudirect::SegmentCopier::create(device, 1u << 16, 4);
  if (!copier.ok()) return copier.status();
  auto stream = gpudirect::CudaStream::create(device);
  if (!stream.ok()) return stream.status();
  mover->copier_ = std::move(copier.value());
  mover->stream_ = std::move(stream.value());
  return mover;
}

SlotMover::~SlotMover() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();  // they finish what is queued first
  // Nothing may still read or write a slot whose registration goes away.
  if (on_gpu()) (void)stream_.synchronize();
}

void SlotMover::work() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
      ++running_;
    }
    job();
    {
      std::lock_guard lock(mutex_);
      --running_;
      if (running_ == 0 && jobs_.empty()) idle_.notify_all();
    }
  }
}

void SlotMover::drain() {
  std::unique_lock lock(mutex_);
  idle_.wait(lock, [&] { return running_ == 0 && jobs_.empty(); });
}

Status SlotMover::run(const Coding& coding, const std::vector<gpudirect::CopySegment>& segments) {
  if (coding.codec == protocol::KvCodec::kIdentity) {
    gpudirect::copy_segments_cpu(segments);
    return Status::Ok();
  }
  const uint64_t row_bytes = uint64_t{coding.channels} * 2;
  for (const gpudirect::CopySegment& s : segments) {
    const uint64_t rows = s.bytes / row_bytes;
    const uint64_t encoded = gpudirect::encoded_rows_bytes(coding.channels, rows);
    const auto* src = reinterpret_cast<const uint8_t*>(s.src);
    auto* dst = reinterpret_cast<uint8_t*>(s.dst);
    const Status st =
        coding.encode
            ? gpudirect::encode_rows(coding.codec, coding.channels, {src, s.bytes}, rows, {dst, encoded})
            : gpudirect::decode_rows(coding.codec, coding.channels, {src, encoded}, rows, {dst, s.bytes});
    if (!st.ok()) return st;
  }
  return Status::Ok();
}

Result<std::optional<gpudirect::PinnedRegistration>> SlotMover::pin(void* p, uint64_t bytes) {
  if (!on_gpu()) return std::optional<gpudirect::PinnedRegistration>();
  // The slots are UCX-mapped memory, which UCX may have page-locked itself (see
  // register_or_reuse): then its registration, which lives as long as the mapping, serves.
  auto pinned = gpudirect::PinnedRegistration::register_or_reuse(p, bytes);
  if (!pinned.ok()) return pinned.status();
  if (pinned->device_pointer() != p) {
    // The segment lists carry host addresses; a GPU that needs other ones (no unified addressing)
    // is not one this transport runs on.
    return Status(ErrorCode::kUnavailable,
                  "pinned staging slots have another address on the GPU (no unified "
                  "virtual addressing): the ucx_staged transport cannot run here");
  }
  return std::optional<gpudirect::PinnedRegistration>(std::move(pinned.value()));
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

void SlotMover::transcode(Coding coding, std::vector<gpudirect::CopySegment> segments, Done done) {
  if (on_gpu()) {
    if (coding.codec == protocol::KvCodec::kIdentity) return copy(std::move(segments), std::move(done));
    return done(Status(ErrorCode::kUnavailable, "KV codecs run on host memory only"));
  }
  if (workers_.empty()) return done(run(coding, segments));
  {
    std::lock_guard lock(mutex_);
    jobs_.push_back([this, coding, segments = std::move(segments), done = std::move(done)]() mutable {
      Status s = run(coding, segments);
      post_([done = std::move(done), s] { done(s); });
    });
  }
  wake_.notify_one();
}

void SlotMover::copy(std::vector<gpudirect::CopySegment> segments, Done done) {
  if (!on_gpu()) return transcode(Coding{}, std::move(segments), std::move(done));
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
