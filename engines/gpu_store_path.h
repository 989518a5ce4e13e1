// GpuStorePath: the GPU half of StoreConnector: copies between an engine's GPU layer buffers and
// the store arena mapped in this process, with no copy through the daemon or a staging buffer.
// The arena (the StoreClient's shared mapping) is page-locked with cudaHostRegister and shared by
// every path of the process that uses that mapping (CUDA refuses a second registration of a
// range); each batch of CopySegments then runs as SegmentCopier kernel launches (16-byte accesses
// straight to or from the pinned arena) on the path's own non-blocking stream, so the engine's
// streams are neither waited for nor slowed.
// Ordering: the path does not wait for the engine's streams. The engine must have finished the
// work that writes the blocks it stores; a load's bytes are in place when wait_layer/synchronize
// return.
// Built with or without CUDA: without it (or without a GPU) create() reports kUnavailable.
// Thread rules: one thread at a time per path (as its connector); the shared arena registrations
// are guarded by a process-wide mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/kv_codec_cuda.h"
#include "kvf/gpudirect/paged_copy.h"
#include "kvf/gpudirect/segment_copier.h"
#include "kvf/protocol/status.h"

namespace kvf::engines {

// One page-locked arena mapping, counted across the process; unregistered when the last holder
// lets go. Move-only.
class ArenaPin {
 public:
  // Registers [base, base + bytes) unless this process holds it already (then shares it).
  // kInvalidArgument when it overlaps a different registration (or memory CUDA already knows as
  // pinned); kUnavailable without CUDA.
  static Result<ArenaPin> acquire(uint8_t* base, uint64_t bytes);
  ArenaPin() = default;
  ArenaPin(ArenaPin&& o) noexcept { *this = std::move(o); }
  ArenaPin& operator=(ArenaPin&& o) noexcept;
  ArenaPin(const ArenaPin&) = delete;
  ArenaPin& operator=(const ArenaPin&) = delete;
  ~ArenaPin() { reset(); }

  bool contains(const uint8_t* p, uint64_t bytes) const;
  // The address kernels use for host byte p (which contains() must cover).
  uint64_t device_address(const uint8_t* p) const;
  void reset();

 private:
  uint8_t* base_ = nullptr;
  uint64_t bytes_ = 0;
  uint64_t device_base_ = 0;
};

class GpuStorePath {
 public:
  // `device`: the GPU holding the engine's layer buffers; `layers`: one completion event per layer.
  static Result<std::unique_ptr<GpuStorePath>> create(int device, uint32_t layers);

  int device() const { return device_; }
  // Makes sure the arena bytes [p, p + bytes) are page-locked: when the arena registered so far
  // does not contain them, `arena` (the client's current mapping, which must) is registered
  // instead. kPeerLost when `arena` does not contain them either (the client reconnected).
  Status pin(std::span<uint8_t> arena, const uint8_t* p, uint64_t bytes);
  // Whether the registration made by pin() covers [p, p + bytes).
  bool pinned(const uint8_t* p, uint64_t bytes) const { return pin_.contains(p, bytes); }
  // The address the GPU uses for arena byte p (after pin() covered it).
  uint64_t device_address(const uint8_t* p) const { return pin_.device_address(p); }

  // Enqueues the copies (engine addresses are device pointers, arena ones device_address()es).
  Status launch(std::span<const gpudirect::CopySegment> segments);
  // Enqueues the fused decode of one encoded chunk in the (pinned) arena straight into the engine's
  // paged blocks (gpudirect/kv_codec_cuda.h): the kernels read the chunk over PCIe, no staging.
  Status launch_decode(const protocol::KvCodecParams& params, const gpudirect::PagedChunks& chunk,
                       const uint8_t* encoded_in_arena);
  // Records layer `layer`'s event behind everything launched so far.
  Status mark_layer(uint32_t layer);
  // Whether the work before layer `layer`'s mark has finished (an error when it failed).
  Result<bool> layer_done(uint32_t layer) const;
  Status wait_layer(uint32_t layer) const;
  // The store pipeline's two chunk marks (slot 0 or 1): a stored chunk's copy is marked and waited
  // for before its commit, while the next chunk's copy runs.
  Status mark_chunk(uint32_t slot);
  Status wait_chunk(uint32_t slot) const;
  // Returns when everything launched has finished.
  Status synchronize() const;

 private:
  GpuStorePath() = default;
  int device_ = -1;
  gpudirect::CudaStream stream_;
  std::unique_ptr<gpudirect::SegmentCopier> copier_;
  std::vector<gpudirect::CudaEvent> layer_events_;
  std::vector<gpudirect::CudaEvent> chunk_events_;  // two
  ArenaPin pin_;
};

}  // namespace kvf::engines
