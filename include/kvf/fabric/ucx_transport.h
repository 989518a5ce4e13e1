// UcxTransport: the Transport over one UCX worker (tcp, shared memory and cma here; rc/dc verbs
// and GPUDirect RDMA where the hardware exists: the same code, UCX picks the lanes). One progress
// thread owns the worker: it busy-polls while operations are in flight and sleeps in epoll on the
// worker's event fd when idle. Thread rules: as Transport (any thread calls; completions on the
// progress thread).
#pragma once

#include <chrono>
#include <memory>

#include "kvf/fabric/transport.h"
#include "kvf/gpudirect/ucx_context.h"

namespace kvf::fabric {

enum class PeerFailureDetection : uint8_t { kAuto, kOn, kOff };

struct UcxTransportOptions {
  // Put requests in flight per peer; more wait in order in a per-peer queue.
  size_t max_outstanding_puts = 64;
  // After the last activity, keep polling this long before sleeping (a receiver of tcp puts must
  // progress its worker for the bytes to land, so it should not sleep mid-stream).
  std::chrono::microseconds spin_before_sleep{2000};
  // Longest sleep when idle: a target of one-sided tcp puts gets no wakeup for them, so it must
  // look on its own. Bounds the extra latency of the first put after an idle period.
  std::chrono::milliseconds max_sleep{1};
  // Whether UCX watches peers (UCP_ERR_HANDLING_MODE_PEER: a dead peer's ops complete with
  // kPeerLost). UCX 1.13 cannot watch its shared-memory lanes, so asking for it on a same-host
  // peer silently moves the data to tcp (5-20x slower here). kAuto watches remote peers, and
  // same-host peers when UCX_TLS leaves no shared memory (UCX 1.13's tcp without it crashed
  // after peers came and went); other same-host peers are watched by their control connection
  // (the kernel closes it when the process dies) and by the scheduler's layer timeout.
  PeerFailureDetection peer_failure = PeerFailureDetection::kAuto;
  // Puts and gets between host memory here and a same-host peer's region that UCX mapped into
  // this process (ucp_rkey_ptr: UCX-allocated memory over its shared-memory transports) are a
  // memcpy on the progress thread. UCX itself moves large puts there by cma, a system call per
  // put, at about a third of its shared-memory copy's rate (one H200 host, perf/RESULTS.md
  // session 11: the host-staged path 1.4x faster this way). Off: every op goes through UCX.
  bool copy_into_mapped_regions = true;
};

class UcxTransport final : public Transport {
 public:
  static Result<std::unique_ptr<UcxTransport>> create(std::shared_ptr<gpudirect::UcxContext> context,
                                                      UcxTransportOptions options = {});
  ~UcxTransport() override;

  std::string_view name() const override { return "ucx"; }
  std::vector<uint8_t> address() const override;
  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options = {}) override;
  Result<RemoteRegionId> import_region(PeerId peer, const protocol::RegionDescriptor& region) override;
  void disconnect(PeerId peer) override;
  void put(PeerId peer, std::vector<PutOp> ops, Completion done) override;
  void get(PeerId peer, std::vector<GetOp> ops, Completion done) override;
  void flush(PeerId peer, Completion done) override;
  void notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) override;
  void set_notification_handler(NotificationHandler handler) override;
  void set_peer_failure_handler(PeerFailureHandler handler) override;
  void post(std::function<void()> fn) override;
  void post_after(std::chrono::nanoseconds delay, std::function<void()> fn) override;
  // True on this transport's progress thread (where tasks, completions and handlers run): a
  // transport built over this one may then act at once instead of queueing behind other tasks.
  bool on_progress_thread() const;

  class Impl;

 private:
  explicit UcxTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::fabric
