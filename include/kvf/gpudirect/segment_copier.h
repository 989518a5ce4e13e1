// SegmentCopier: executes a batch of CopySegments (paged_copy.h) on one CUDA device with a single
// kernel launch, so gathering or scattering thousands of small KV blocks costs one launch instead
// of thousands of cudaMemcpyAsync calls. It owns a ring of descriptor slots (pinned host staging,
// a device buffer and a CUDA event each); a slot is refilled only after the launch that read it has
// finished, so the host never overwrites descriptors a kernel may still read.
//
// The stream is an opaque `void*` (a cudaStream_t of this device; nullptr is its legacy default
// stream) so this header compiles without CUDA. Copies are asynchronous: the memory behind the
// segments must stay valid until the stream has passed them; the caller records events or
// synchronizes. A build without CUDA compiles and links, and create() reports kUnavailable.
//
// Thread rules: one thread at a time per copier (the slot ring is not synchronized). Different
// copiers may be used from different threads.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <utility>

#include "kvf/gpudirect/paged_copy.h"
#include "kvf/protocol/status.h"

namespace kvf::gpudirect {

// Segments kept in device memory with addresses relative to a source and a destination base, so
// that one request plan serves every layer: each layer's launch passes its two bases and uploads
// nothing. Made by SegmentCopier::make_resident; must outlive every launch that uses it (destroy
// it only after those streams have passed them). Move-only.
class ResidentSegments {
 public:
  ResidentSegments() = default;
  ResidentSegments(ResidentSegments&& o) noexcept { *this = std::move(o); }
  ResidentSegments& operator=(ResidentSegments&& o) noexcept {
    if (this != &o) {
      reset();
      segments_ = std::exchange(o.segments_, nullptr);
      count_ = std::exchange(o.count_, 0);
      bytes_ = std::exchange(o.bytes_, 0);
      device_ = o.device_;
    }
    return *this;
  }
  ResidentSegments(const ResidentSegments&) = delete;
  ResidentSegments& operator=(const ResidentSegments&) = delete;
  ~ResidentSegments() { reset(); }

  uint32_t count() const { return count_; }  // after splitting into kMaxSegmentBytes pieces
  uint64_t bytes() const { return bytes_; }

 private:
  friend class SegmentCopier;
  void reset();
  void* segments_ = nullptr;  // device memory: count_ CopySegments
  uint32_t count_ = 0;
  uint64_t bytes_ = 0;
  int device_ = -1;
};

// How the copy kernel is launched: how many thread blocks at most (0: as many as are resident at
// once on the device), threads per block, and how many 16-byte loads each thread keeps in flight
// before storing. The defaults are what the transports use; the tuning sweep
// (kvfabric-gpu-kernel-sweep) measures others against the raw link.
struct KernelShape {
  uint32_t max_blocks = 0;
  uint32_t threads = 512;  // 128, 256 or 512
  uint32_t unroll = 4;     // 4, 8 or 16
};

class SegmentCopier {
 public:
  // copy() splits longer segments into pieces of this size first, so the work spreads over all
  // thread blocks (each thread block copies whole segments).
  static constexpr uint64_t kMaxSegmentBytes = 64 * 1024;

  // `device`: the CUDA device whose streams the copies run on (sources and destinations may be
  // anywhere that device can address: its memory, peers' memory with peer access, pinned host).
  // `max_segments_per_launch` sizes each slot's descriptor buffers (24 bytes a segment);
  // `slots` is how many launches may be in flight before copy() waits for the oldest.
  // kUnavailable without CUDA or without that device; kInvalidArgument for zero sizes.
  static Result<std::unique_ptr<SegmentCopier>> create(int device,
                                                       uint32_t max_segments_per_launch = 1u << 16,
                                                       uint32_t slots = 8);
  ~SegmentCopier();
  SegmentCopier(const SegmentCopier&) = delete;
  SegmentCopier& operator=(const SegmentCopier&) = delete;

  // Enqueues the copies on `cuda_stream` as one kernel launch (more only when, after splitting,
  // there are more than max_segments_per_launch segments). Bytes are copied with 16-byte vector
  // accesses wherever source and destination are equally aligned, narrower ones otherwise.
  // May block while all slots are still in use by earlier launches. Rejects (kInvalidArgument) a
  // segment with a null address before anything is enqueued: a faulting kernel would poison the
  // whole CUDA context.
  Status copy(std::span<const CopySegment> segments, void* cuda_stream);

  // The same copies issued to the copy engines (cudaMemcpyBatchAsync with CUDA 13 on a non-default
  // stream, one cudaMemcpyAsync per segment otherwise), so a benchmark or cost model can compare
  // them with the kernel. Segments are not split.
  // `batched` false: one cudaMemcpyAsync per segment even where the batch API exists (for a few
  // large segments the two may differ in which engines and paths the driver picks; benchmarks
  // compare them).
  Status copy_with_copy_engines(std::span<const CopySegment> segments, void* cuda_stream,
                                bool batched = true);

  // Uploads `relative` (src and dst are offsets from the bases given at launch), split into pieces
  // of kMaxSegmentBytes, and returns once the copy to the device is done. kInvalidArgument when
  // there are more pieces than max_segments_per_launch.
  Result<ResidentSegments> make_resident(std::span<const CopySegment> relative);
  // One launch of `segments` with every source at src_base + src and destination at dst_base +
  // dst. Nothing is uploaded. kInvalidArgument for a zero base.
  Status copy_resident(const ResidentSegments& segments, uint64_t src_base, uint64_t dst_base,
                       void* cuda_stream);

  // kInvalidArgument for a shape the kernel is not built for. Applies to later launches.
  Status set_kernel_shape(const KernelShape& shape);
  KernelShape kernel_shape() const;

  int device() const;
  int multiprocessors() const;  // the device's SM count (0 without CUDA)
  uint32_t max_segments_per_launch() const;
  uint64_t kernel_launches() const;  // launches so far, for tests and metrics

 private:
  struct Impl;
  explicit SegmentCopier(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::gpudirect
