// SlotMover: moves a segment list between a staged transport's slots (host memory registered with
// UCX) and the KV memory the puts name, in one of two ways chosen when the transport is made:
// on the CPU (KV in host memory: memcpy per segment, or a KV codec's row encode/decode), or with
// the GPU's copy kernel (KV in one GPU's memory: one launch per list, the slots pinned so the
// kernel reads and writes them across PCIe). The staged transport gathers with it before a UCX put
// and scatters with it after one.
//
// CPU work runs on `workers` threads of the mover's own (0: on the calling thread), so that a
// progress thread handing it a slot keeps driving UCX while the slot is copied or encoded; each
// job is one slot's list, jobs run in any order across workers.
//
// Threads: one thread (the transport's progress thread) calls copy(), transcode(), poll() and
// drain(); `done` runs on that thread: from copy() itself (CPU, no workers), through `post` (CPU
// workers), or from a later poll() (GPU).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/paged_copy.h"
#include "kvf/gpudirect/segment_copier.h"
#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/status.h"

namespace kvf::fabric {

class SlotMover {
 public:
  using Done = std::function<void(const Status&)>;
  using Post = std::function<void(std::function<void()>)>;  // runs a closure on the owner's thread

  // How a CPU job treats its segments: copy them, or encode raw rows into a slot (a segment's
  // `bytes` are raw: whole rows of channels x 2 bytes; its dst receives rows x (4 + channels)
  // bytes, gpudirect::encode_rows), or decode a slot's encoded rows into raw destinations.
  struct Coding {
    protocol::KvCodec codec = protocol::KvCodec::kIdentity;  // identity: a copy
    uint32_t channels = 0;
    bool encode = true;
  };

  // device < 0: the CPU with `workers` threads (0: inline; then `post` may be empty). Otherwise
  // the copy kernel on that GPU (fails where there is none; workers and post unused).
  static Result<std::unique_ptr<SlotMover>> create(int device, uint32_t workers = 0, Post post = {});
  ~SlotMover();
  SlotMover(const SlotMover&) = delete;
  SlotMover& operator=(const SlotMover&) = delete;

  bool on_gpu() const { return device_ >= 0; }
  int device() const { return device_; }
  // Makes `bytes` at `p` (slots) reachable by the copy kernel (cudaHostRegister; or, where UCX
  // page-locked its mapping already, UCX's registration) for as long as the caller keeps the
  // registration, which it must drop before it frees the memory: a
  // registration that outlives its pages stays in the driver, and a later allocation that reuses
  // their addresses fails (a receiver's next stream once failed cudaMalloc with
  // cudaErrorAlreadyMapped). None on the CPU.
  Result<std::optional<gpudirect::PinnedRegistration>> pin(void* p, uint64_t bytes);
  // Whether a put may name [p, p+bytes) as KV memory: host memory registered with UCX (CPU), or
  // cudaMalloc'd memory of this mover's GPU.
  Status check_kv_memory(const void* p, uint64_t bytes) const;
  // Copies the segments (absolute addresses); `done` runs once they are all in place.
  void copy(std::vector<gpudirect::CopySegment> segments, Done done);
  // CPU only (kUnavailable on the GPU unless identity): copies, encodes or decodes as `coding`
  // says; the first error (a row the codec refuses) is done's status.
  void transcode(Coding coding, std::vector<gpudirect::CopySegment> segments, Done done);
  // GPU: runs `done` of every copy that has finished. True while copies are outstanding.
  bool poll();
  // Waits until no job runs or waits on a worker (their `done`s are posted, not run). Before the
  // memory a queued job touches goes away.
  void drain();

 private:
  explicit SlotMover(int device) : device_(device) {}
  struct Pending {
    gpudirect::CudaEvent event;
    Done done;
  };
  static Status run(const Coding& coding, const std::vector<gpudirect::CopySegment>& segments);
  void work();

  int device_ = -1;
  std::unique_ptr<gpudirect::SegmentCopier> copier_;
  gpudirect::CudaStream stream_;
  std::deque<Pending> pending_;  // in launch order, which is the order they finish on one stream

  // CPU workers.
  Post post_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable idle_;
  std::deque<std::function<void()>> jobs_;
  uint32_t running_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvf::fabric
