// SlotMover: copies a segment list between a staged transport's slots (host memory registered with
// UCX) and the KV memory the puts name, in one of two ways chosen when the transport is made:
// on the CPU (KV in host memory: memcpy per segment), or with the GPU's copy kernel (KV in one
// GPU's memory: one launch per list, the slots pinned so the kernel reads and writes them across
// PCIe). The staged transport gathers with it before a UCX put and scatters with it after one.
//
// Threads: one thread (the transport's progress thread) calls copy() and poll(); `done` runs on
// that thread, from copy() itself (CPU) or from a later poll() (GPU).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/paged_copy.h"
#include "kvf/gpudirect/segment_copier.h"
#include "kvf/protocol/status.h"

namespace kvf::fabric {

class SlotMover {
 public:
  using Done = std::function<void(const Status&)>;

  // device < 0: the CPU. Otherwise the copy kernel on that GPU (fails where there is none).
  static Result<std::unique_ptr<SlotMover>> create(int device);
  ~SlotMover();
  SlotMover(const SlotMover&) = delete;
  SlotMover& operator=(const SlotMover&) = delete;

  bool on_gpu() const { return device_ >= 0; }
  int device() const { return device_; }
  // Makes `bytes` at `p` (a slot) reachable by the copy kernel (cudaHostRegister); a no-op on the
  // CPU. The registration lives as long as this mover.
  Status pin(void* p, uint64_t bytes);
  // Whether a put may name [p, p+bytes) as KV memory: host memory registered with UCX (CPU), or
  // cudaMalloc'd memory of this mover's GPU.
  Status check_kv_memory(const void* p, uint64_t bytes) const;
  // Copies the segments (absolute addresses); `done` runs once they are all in place.
  void copy(std::vector<gpudirect::CopySegment> segments, Done done);
  // GPU: runs `done` of every copy that has finished. True while copies are outstanding.
  bool poll();

 private:
  explicit SlotMover(int device) : device_(device) {}
  struct Pending {
    gpudirect::CudaEvent event;
    Done done;
  };
  int device_ = -1;
  std::unique_ptr<gpudirect::SegmentCopier> copier_;
  gpudirect::CudaStream stream_;
  std::vector<gpudirect::PinnedRegistration> pinned_;
  std::deque<Pending> pending_;  // in launch order, which is the order they finish on one stream
};

}  // namespace kvf::fabric
