// CudaIpcTransport: the Transport between processes of one host whose KV lives in GPU memory.
// Bytes move GPU to GPU through CUDA IPC mappings of the peer's regions, by default straight into
// the peer's blocks: one batched copy kernel per put batch (SM peer writes) for many small
// extents, or the copy engines for large ones (the cost model below). With kStaged a put batch is
// staged instead, and the receiver places it: a kernel gathers the extents on this GPU into a
// contiguous slot, the copy engines move the slot over NVLink into a slot the receiver allocated
// on its GPU and exported, and the receiver's transport scatters it into its blocks with one
// kernel in its own CUDA context, then answers. So the link carries one large copy-engine copy per
// layer (SM peer writes reach only ~0.8x of the link) and no process launches work on another
// process's GPU (without MPS that time-slices the two contexts). Staging is set up on the first
// staged put to a peer (request, offer: the receiver->sender reply path), at most
// `staging_receive_limit` bytes per receiver; a receiver that cannot offer slots makes the sender
// fall back to direct copies, with a warning. Notifications, peer liveness and regions in host
// memory go over an inner UcxTransport (shared memory or tcp), so notifications sent from a
// flush's completion still land behind the data.
//
// Threads: as Transport (any thread calls; completions, timers and handlers on the inner UCX
// transport's progress thread). All CUDA work is issued from that thread on non-blocking streams
// of `device`; completions come from CUDA events polled there.
#pragma once

#include <chrono>
#include <memory>

#include "kvf/fabric/transport.h"
#include "kvf/fabric/ucx_transport.h"
#include "kvf/gpudirect/ucx_context.h"

namespace kvf::fabric {

enum class CudaCopyMethod : uint8_t {
  kAuto,               // the cost model: copy engines when extents are large, the kernel otherwise
  kKernel,             // one batched copy kernel per put batch (SMs do the peer writes)
  kCopyEngine,         // the copy engines, one batched call (no SMs used: compute keeps the whole GPU)
  kCopyEnginePerCopy,  // the copy engines, one cudaMemcpyAsync per extent
  kStaged,             // gather here -> one copy-engine copy -> the receiver scatters (see above)
  kNccl,               // the nccl transport: staged as kStaged, the slot moved by ncclSend/ncclRecv
  // Per put, from the link's state (fabric/copy_choice.h): staged when the put's data is ready and
  // earlier puts to the peer are still copying (the link is the bottleneck, and staged copies
  // move more bytes per second), direct (as kAuto) otherwise: a lone put, or one that waits for
  // its layer's compute, goes straight into the peer's blocks with no staging round trip, so the
  // last layer of an overlapped prefill lands one layer's copy after its compute. Only to a peer
  // whose blocks are on another GPU (staging on one GPU only adds copies), unless
  // `adaptive_stages_same_gpu`. Opt-in until it has run over NVLink.
  kAdaptive,
};

struct CudaIpcTransportOptions {
  int device = 0;  // the GPU whose memory this process sends from and receives into
  CudaCopyMethod copy = CudaCopyMethod::kAuto;
  // Staged copies: bytes per staging slot (a Llama-3-8B layer of 8192 tokens is 32 MiB). Two slots
  // on this GPU per peer and `staging_remote_slots` on the receiver's, allocated on the first staged
  // put; larger batches go through them in pieces. 0: 64 MiB (layers queued together share a
  // copy: a 64 MiB copy-engine copy ran at 0.97 of the link against 0.93 for 32 MiB on 2x H200, and
  // one 32 MiB ncclSend at 0.86 of a 1 GiB one). Until session 9 nccl used 32 MiB, as 128 MiB slots
  // measured slower then; that was with the scheduler's window at 128 MiB (one chunk in flight)
  // and ~190 us of host encoding per 128 MiB Scatter, both since changed; not yet re-measured.
  uint64_t staging_bytes = 0;
  uint32_t staging_remote_slots = 4;
  // Each staged chunk's copy is split over this many streams (1..4), so several copy engines
  // can carry one chunk.
  uint32_t staging_copy_streams = 1;
  // Hand staging slots back on the GPUs (CudaStream::wait_value/write_value on per-slot counters)
  // instead of with the receiver's answers, so the sender queues chunks ahead without waiting a
  // host round trip per slot (the answers still complete the puts). Off by default: on 2x H200 it
  // measured no faster (0.75x of cudaMemcpyPeer against 0.76x without; perf/RESULTS.md, session
  // 7). Used only when the receiver offers it (older receivers do not).
  bool staging_handover = false;
  // Issue staged copies with cudaMemcpyFlagPreferOverlapWithCompute (CudaStream::copy_async). An
  // experiment, off by default: between two processes a gather kernel beside a staged copy held
  // the copy back by about the kernel's length, and this hint is the driver's one knob on how
  // a copy shares the GPU with kernels. Not measured yet.
  bool staging_copy_overlap_hint = false;
  // Staged copies launched ahead of the copy engines, at most (0: as many as the receiver has
  // free slots). With a limit, layers queued behind the copies in flight go together into one
  // slot-sized copy (a 64 MiB copy runs nearer the link rate than two of 32 MiB), and a layer that
  // finds nothing queued still goes at once.
  uint32_t staging_copies_ahead = 0;
  // kAdaptive: stage to a peer on this same GPU too. For tests on a one-GPU machine (both
  // processes on GPU 0), where the mix of direct and staged puts must still be exercised.
  bool adaptive_stages_same_gpu = false;
  // As a receiver: the most GPU memory all senders' staging slots may take together.
  uint64_t staging_receive_limit = 1ull << 30;
  // kAuto: batches whose mean extent is at least this many bytes go to the copy engines. A copy
  // engine op costs a few microseconds to start, so for 32 KiB extents the kernel wins; for
  // megabytes the engines reach the link rate without taking SMs from the engine's compute.
  uint64_t copy_engine_min_extent = 512 << 10;
  // Put batches go round-robin over this many CUDA streams, so one layer's copy overlaps the
  // previous one's tail (a kernel's last wave, its descriptor upload) instead of waiting for it.
  uint32_t streams = 1;
  // Upload a request's extents once and launch each layer with two base addresses (no per-layer
  // descriptor upload). Off until it has run on a GPU: its GPU test and stream test are written.
  bool resident_plans = false;
  // The most thread blocks one copy kernel (gather, scatter, direct put) launches; 0: automatic,
  // which is every block that fits on the GPU, except for the nccl transport: there one block per
  // SM, because a gather or scatter kernel holding every SM keeps NCCL's send and receive kernels
  // (which run beside it on other streams) off the GPU until it ends, on both GPUs in turn.
  uint32_t copy_kernel_blocks = 0;
  // How often the progress thread looks at outstanding CUDA events while any are pending.
  std::chrono::microseconds poll_interval{4};
  UcxTransportOptions ucx;
};

// Which transport wrote `address` ("cuda_ipc" or "ucx"), so that a receiver can refuse a sender
// running another transport with a clear error instead of feeding one's address to the other.
std::string_view transport_kind_of_address(std::span<const uint8_t> address);

class CudaIpcTransport final : public Transport {
 public:
  // Fails (kUnavailable) when the build has no CUDA, the device does not exist, or UCX fails.
  static Result<std::unique_ptr<CudaIpcTransport>> create(std::shared_ptr<gpudirect::UcxContext> context,
                                                          CudaIpcTransportOptions options = {});
  ~CudaIpcTransport() override;

  std::string_view name() const override;  // "cuda_ipc", or "nccl" with CudaCopyMethod::kNccl
  std::vector<uint8_t> address() const override;
  // Refuses (kUnavailable) a peer on another host or one that offers no cuda_ipc address.
  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options = {}) override;
  // CUDA regions are mapped (cudaIpcOpenMemHandle, cached per peer and allocation); host regions
  // are imported on the inner UCX transport.
  Result<RemoteRegionId> import_region(PeerId peer, const protocol::RegionDescriptor& region) override;
  void disconnect(PeerId peer) override;
  // A batch goes either to GPU regions or to host regions, not both. `done` runs when the
  // copies have finished (for GPU regions that is also remote completion). Called on the progress
  // thread (from a completion or handler, as the scheduler does), put and flush act at once
  // instead of queueing behind earlier tasks; `done` may then run before they return (an error
  // found at once), and the flush covers the puts already started, not puts another thread
  // made that are still queued.
  void put(PeerId peer, std::vector<PutOp> ops, Completion done) override;
  void put_after_event(PeerId peer, std::vector<PutOp> ops, void* cuda_event, Completion done) override;
  void flush(PeerId peer, Completion done) override;
  void notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) override;
  void set_notification_handler(NotificationHandler handler) override;
  void set_peer_failure_handler(PeerFailureHandler handler) override;
  void post(std::function<void()> fn) override;
  void post_after(std::chrono::nanoseconds delay, std::function<void()> fn) override;
  // Staged, adaptive and nccl: two rounds of the receiver's slots (staging_remote_slots x the slot
  // size), so queued layers pack into slot-sized copies while every slot is busy; direct: none.
  uint64_t suggested_inflight_bytes() const override;

  int device() const;

  class Impl;

 private:
  explicit CudaIpcTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::fabric
