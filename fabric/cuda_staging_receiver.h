// StagingReceiver: the receiving end of the cuda_ipc transport's staged puts (kStaged). A sender
// asks for staging; this side allocates the slots on its own GPU and exports them; the sender's
// copy engines fill a slot over NVLink; this side then scatters the slot into its own blocks with
// one kernel launch on its own stream, in its own CUDA context, so no other process ever runs
// kernels on this GPU. Every destination a sender names is checked first: it must lie inside one
// cudaMalloc'd allocation on this GPU that is not staging, or the scatter is refused with the
// reason and nothing is written.
//
// Threads: the transport's progress thread only (it issues all CUDA work of the transport).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <unordered_map>

#include "kvf/gpudirect/cuda_memory.h"
#include "kvf/gpudirect/nccl_comm.h"
#include "kvf/gpudirect/resident_plan_cache.h"
#include "kvf/gpudirect/segment_copier.h"
#include "kvf/protocol/staging_messages.h"

namespace kvf::fabric {

namespace staging = protocol::staging;

class StagingReceiver {
 public:
  // Calls `done` once every CUDA operation enqueued on `stream` so far has finished (or failed).
  using WhenStreamDone =
      std::function<void(const gpudirect::CudaStream& stream, std::function<void(const Status&)> done)>;

  // `copier` (on `device`) must outlive this object. At most `max_bytes` of staging in all.
  StagingReceiver(int device, gpudirect::SegmentCopier& copier, WhenStreamDone when_done, uint64_t max_bytes);
  ~StagingReceiver();

  // Allocates and exports slots for `request.sender` (again: the same slots are offered again).
  // The answer carries an error instead when this GPU cannot hold them. With `request.handover`
  // the slots are handed back on the GPUs (see Slots) and the offer says where the ready counters
  // are; when the sender's counters cannot be mapped here, the offer is made without hand-over.
  // With `comm` (the nccl transport, joined by the caller) slots are filled by receives on it.
  staging::StagingOffer offer(const staging::StagingRequest& request, gpudirect::NcclComm comm = {});
  // Places a filled slot; `reply` runs once with the outcome (after the bytes are in place).
  void scatter(const staging::Scatter& scatter, std::function<void(staging::Scattered)> reply);
  // Forgets a sender (it closed, disconnected or died); its slots are freed once nothing queued
  // uses them. Returns its NCCL communicator (nccl transport), which the caller must close off
  // this thread: closing waits for the peer (NcclComm::close).
  gpudirect::NcclComm drop(uint64_t sender);

 private:
  struct Slots {
    gpudirect::DeviceBuffer buffer;
    gpudirect::CudaStream stream;
    uint32_t slots = 0;
    uint64_t slot_bytes = 0;
    std::vector<gpudirect::CudaEvent> filled;  // the sender's per-slot events, opened here
    gpudirect::CudaEvent idle;                 // recorded when dropped: freed once it fires
    gpudirect::NcclComm comm;                  // the nccl transport: slots arrive by ncclRecv
    // nccl: receives run on their own stream, so receiving slot k+1 overlaps scattering slot k;
    // the scatter waits for its slot's `received` event. (A slot is reused only after the
    // sender heard that its last scatter finished, so one event per slot suffices.)
    gpudirect::CudaStream receive_stream;
    std::vector<gpudirect::CudaEvent> received;
    // GPU hand-over (cuda_ipc, when the sender asked for it): per slot a "ready" counter after the
    // slots in `buffer`, which the sender's copy stream sets to a slot's use number once the copy
    // into it is done, and the sender's "freed" counters, mapped here, which this stream sets to
    // that use once the slot is scattered. The scatter of use u waits for ready >= u on the GPU,
    // so the sender need not wait for this side's answer before it refills a slot.
    uint32_t* ready = nullptr;
    std::unique_ptr<gpudirect::CudaIpcMapping> freed;
    std::vector<uint32_t> last_use;  // per slot, the latest use a Scatter named
  };
  // Lets a stream stuck waiting for a sender that will never fill its slots (it died or closed
  // mid-stream) run on: every ready counter is set to the latest use named. The scatters then
  // copy whatever their slots hold into the sender's destinations, which no completed put covers.
  void release_waits(Slots& slots);
  void free_retired();
  Status check_destination(uint64_t destination, uint64_t bytes);
  const gpudirect::ResidentSegments* plan_for(uint64_t slot_base);
  static constexpr size_t kMaxPlans = 256;
  static constexpr uint64_t kCounterBytes = 4096;  // room for the hand-over counters (kMaxSlots of them)

  int device_;
  gpudirect::SegmentCopier& copier_;
  WhenStreamDone when_done_;
  uint64_t max_bytes_;
  uint64_t allocated_ = 0;
  std::unordered_map<uint64_t, std::unique_ptr<Slots>> senders_;
  // Dropped senders' slots, kept until their stream has passed everything queued on it: a dead
  // sender's copy may never signal its event, and waiting for it here would stop this thread.
  std::vector<std::unique_ptr<Slots>> retired_;
  // Allocations already checked to be this GPU's device memory: base -> end.
  std::map<uintptr_t, uintptr_t> known_allocations_;
  std::pair<uintptr_t, uintptr_t> last_checked_{0, 0};
  std::vector<gpudirect::CopySegment> segments_;
  std::vector<gpudirect::CopySegment> relative_;
  // Uploaded scatter plans (see plan_for), kept for this object's life: a launch may still use
  // one, and a dead sender's stream may never let us know when it is safe to free.
  gpudirect::ResidentPlanCache plans_{copier_, kMaxPlans};
  uint64_t plan_dst_base_ = 0;
};

}  // namespace kvf::fabric
