// NcclComm: a two-rank NCCL communicator between this process and one peer, for the nccl
// transport's send/recv of staging slots (fabric/cuda_ipc_transport.h, CudaCopyMethod::kNccl).
// libnccl.so.2 is loaded at run time (dlopen), so every kvfabric binary starts where NCCL is not
// installed, and the nccl transport says why it cannot run there. NVLink multicast (NVLS) is
// switched off unless the user set NCCL_NVLS_ENABLE: two-rank send/recv never needs it, and on a
// shared host it can take the GPUs out of service.
//
// Threads: create() blocks until the peer has joined with the same id, the deadline passes or
// `stop` turns true (call it off any thread that must keep serving); send/recv enqueue on a stream
// and return; one thread at a time per object.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kvf/protocol/status.h"

namespace kvf::gpudirect {

class NcclComm {
 public:
  // Whether NCCL can be loaded here; the reason when not.
  static Status available();
  // A fresh communicator id for the peer to join with: two ncclGetUniqueId ids (256 bytes), one
  // to join with and one for the blocking communicator the data path runs on.
  static Result<std::vector<uint8_t>> unique_id();
  // Joins the two-rank communicator `id` as `rank` (0 or 1) on `device` and connects rank 0 to
  // rank 1 with a one-byte send/recv; blocks until both sides have done so. A peer that never
  // joins fails it with kTimeout after `timeout`, or at once with kAborted once *stop is true
  // (so a process that is shutting down never waits on a peer that refused or died). With a
  // two-id `id` (unique_id()), the communicator returned is a blocking one joined on the second id
  // after the first (non-blocking) has connected: NCCL enqueues on it without a thread per call.
  static Result<NcclComm> create(std::span<const uint8_t> id, int rank, int device,
                                 std::chrono::milliseconds timeout, const std::atomic<bool>* stop = nullptr);

  NcclComm() = default;
  NcclComm(NcclComm&& o) noexcept
      : comm_(std::exchange(o.comm_, nullptr)), rank_(o.rank_), device_(o.device_), blocking_(o.blocking_) {}
  NcclComm& operator=(NcclComm&& o) noexcept {
    if (this != &o) {
      reset();
      comm_ = std::exchange(o.comm_, nullptr);
      rank_ = o.rank_;
      device_ = o.device_;
      blocking_ = o.blocking_;
    }
    return *this;
  }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  ~NcclComm() { reset(); }

  bool valid() const { return comm_ != nullptr; }
  // `bytes` from/into device memory, to/from the other rank, on `cuda_stream` (a cudaStream_t of
  // this communicator's device). Sends and receives pair up in the order each side enqueues them.
  Status send(const void* data, uint64_t bytes, void* cuda_stream);
  Status recv(void* data, uint64_t bytes, void* cuda_stream);
  // Several buffers as one NCCL group (one launch); the peer receives them with as many receives
  // of the same sizes, in the same order, e.g. back to back with recv(data, sizes, ...).
  struct Part {
    const void* data = nullptr;
    uint64_t bytes = 0;
  };
  Status send(std::span<const Part> parts, void* cuda_stream);
  // Receives parts of sizes[0], sizes[1], ... bytes one after another from `data` on (one group).
  Status recv(void* data, std::span<const uint64_t> sizes, void* cuda_stream);
  // Ends the communicator now: operations still queued fail instead of waiting for the peer.
  void abort();
  // Closes the communicator in step with the peer (NCCL's destroy is collective: it waits until
  // the peer closes too), so both sides must call it; gives up and aborts after `timeout`. Blocks:
  // call it off any thread that must keep serving. The destructor closes with a 10 s limit. The
  // data path runs on a blocking communicator joined at create(): that one is aborted (nothing of
  // it may still be queued when it is closed).
  Status close(std::chrono::milliseconds timeout);
  // A failure NCCL found after the fact (the peer died, a network error), or Ok.
  Status async_error() const;

 private:
  NcclComm(void* comm, int rank, int device, bool blocking)
      : comm_(comm), rank_(rank), device_(device), blocking_(blocking) {}
  // Joins the blocking communicator the data path runs on (see the .cu), giving up at `deadline`
  // or on *stop.
  static Result<NcclComm> join_blocking(std::span<const uint8_t> id, int rank, int device,
                                        std::chrono::steady_clock::time_point deadline,
                                        const std::atomic<bool>* stop);
  // Connects rank 0 -> 1 now (see create), giving up at `deadline` or on *stop.
  Status warm_up(std::chrono::steady_clock::time_point deadline, const std::atomic<bool>* stop);
  Status finish_enqueue(const char* what, int result);  // waits out a non-blocking "in progress"
  void reset();
  void* comm_ = nullptr;  // ncclComm_t
  int rank_ = 0;
  int device_ = -1;
  bool blocking_ = false;  // sends and receives enqueue synchronously; close() aborts
};

}  // namespace kvf::gpudirect
