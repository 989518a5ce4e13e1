// StagedTransport ("ucx_staged"): the host-staged path. Every put is gathered into a slot of this
// side's host memory, crosses the link as one UCX put into a slot the receiver offered in its
// host memory, and the receiver scatters it to the destinations the put named:
//   KV (GPU or host) -> gather -> host slot -> UCX (tcp, shm, verbs) -> host slot -> scatter -> KV
// It connects wherever UCX does and needs nothing of UCX but host memory, so it carries GPU KV
// between hosts when UCX has no CUDA support and no better transport connects; on host memory it
// turns many small extents into few large transfers over a slow link.
//
// With `device` set, KV lives in that GPU's memory: gathers and scatters are one copy-kernel
// launch each through pinned slots. Otherwise KV is host memory and the CPU copies. The receiver
// places bytes only in memory it could have been written by a put anyway (UCX-registered host
// memory, or cudaMalloc'd memory of its GPU), outside its slots, and answers each slot; a put
// completes when every byte of it is placed, so a flush after it means "arrived".
// Messages: the cuda_ipc transport's staging messages (request/offer/scatter/scattered/closed)
// over the inner UCX connection and a connection back to the sender.
//
// Threads: as Transport; one progress thread (the inner UcxTransport's). Connections back to
// senders and slot imports, which block, run on helper threads joined at destruction.
#pragma once

#include <chrono>
#include <memory>

#include "kvf/fabric/transport.h"
#include "kvf/fabric/ucx_transport.h"
#include "kvf/gpudirect/ucx_context.h"

namespace kvf::fabric {

struct StagedTransportOptions {
  int device = -1;                                  // where KV lives: -1 host memory, N GPU N
  uint64_t slot_bytes = 8ull << 20;                 // one gather / one UCX put / one scatter
  uint32_t slots = 4;                               // slots per sender on each side (bytes in flight)
  uint64_t receive_limit = 1ull << 30;              // slots this receiver gives all senders together
  std::chrono::milliseconds offer_timeout{10'000};  // a receiver that never offers fails the puts
  UcxTransportOptions ucx;
};

class StagedTransport final : public Transport {
 public:
  // kUnavailable when `device` is set and this build or machine has no such GPU.
  static Result<std::unique_ptr<StagedTransport>> create(std::shared_ptr<gpudirect::UcxContext> context,
                                                         StagedTransportOptions options = {});
  ~StagedTransport() override;

  std::string_view name() const override { return "ucx_staged"; }
  std::vector<uint8_t> address() const override;
  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options = {}) override;
  // Remembers where the region lies in the peer's memory: the receiver places bytes there itself.
  Result<RemoteRegionId> import_region(PeerId peer, const protocol::RegionDescriptor& region) override;
  void disconnect(PeerId peer) override;
  void put(PeerId peer, std::vector<PutOp> ops, Completion done) override;
  void flush(PeerId peer, Completion done) override;
  void notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) override;
  void set_notification_handler(NotificationHandler handler) override;
  void set_peer_failure_handler(PeerFailureHandler handler) override;
  void post(std::function<void()> fn) override;
  void post_after(std::chrono::nanoseconds delay, std::function<void()> fn) override;

  class Impl;

 private:
  explicit StagedTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// True when `address` was written by a StagedTransport.
bool is_staged_transport_address(std::span<const uint8_t> address);

}  // namespace kvf::fabric
