// Transport: moves bytes between registered regions of two peers (one-sided puts and gets) and carries
// small notifications. Implementations: UcxTransport (tcp/shm/cma here, rc/dc verbs on RDMA
// hardware) and LocalTransport (same process, for unit tests of logic).
//
// Threads: every method may be called from any thread. Each transport has one progress thread;
// all completions, timers and handlers run on it, never on the caller's thread. Completions are
// values: a Completion is called exactly once with the outcome. Setup calls (connect,
// import_region) block the caller until the progress thread has done them.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <span>
#include <string_view>
#include <vector>

#include "kvf/gpudirect/memory_region.h"
#include "kvf/protocol/messages.h"
#include "kvf/protocol/status.h"

namespace kvf::fabric {

using PeerId = uint32_t;
using RemoteRegionId = uint32_t;  // a peer's region imported on this transport
using Completion = std::function<void(const Status&)>;
using NotificationHandler = std::function<void(std::span<const uint8_t>)>;
using PeerFailureHandler = std::function<void(PeerId, const Status&)>;

// One extent to write: `length` bytes from `local` (inside `local_region`) to `remote_offset`
// bytes into the imported remote region.
struct PutOp {
  const void* local = nullptr;
  const gpudirect::MemoryRegion* local_region = nullptr;  // may be null for unregistered memory
  RemoteRegionId remote = 0;
  uint64_t remote_offset = 0;
  uint64_t length = 0;
};

// One extent to read: `length` bytes from `remote_offset` bytes into the imported remote region
// into `local` (inside `local_region`, registered for the transport where it needs that).
struct GetOp {
  void* local = nullptr;
  const gpudirect::MemoryRegion* local_region = nullptr;
  RemoteRegionId remote = 0;
  uint64_t remote_offset = 0;
  uint64_t length = 0;
};

// What the caller knows about a peer it connects to.
struct ConnectOptions {
  bool same_host = false;  // the peer runs on this host (its control address is one of ours)
};

class Transport {
 public:
  virtual ~Transport() = default;

  virtual std::string_view name() const = 0;
  // What a peer passes to connect() to reach this transport.
  virtual std::vector<uint8_t> address() const = 0;

  // Setup: opens a connection to the transport at `address`.
  virtual Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options = {}) = 0;
  // Setup: makes a peer's region writable from here. Puts are bounds-checked against it.
  virtual Result<RemoteRegionId> import_region(PeerId peer, const protocol::RegionDescriptor& region) = 0;
  // Closes the connection; queued operations complete with kAborted.
  virtual void disconnect(PeerId peer) = 0;

  // Posts puts in order. `done` runs when every op is locally complete (source reusable) or the
  // first error is known. Out-of-bounds ops fail the whole batch with kInvalidArgument, none posted.
  virtual void put(PeerId peer, std::vector<PutOp> ops, Completion done) = 0;
  // As put, but the puts start only once `cuda_event` (a cudaEvent_t the engine recorded after the
  // layer's compute) has completed; the caller never waits. The event must stay valid until
  // `done` runs. This default polls the event on the progress thread; transports with CUDA
  // streams make the stream wait instead.
  virtual void put_after_event(PeerId peer, std::vector<PutOp> ops, void* cuda_event, Completion done);
  // One-sided reads from the peer's imported regions, in order. `done` runs when every byte has
  // landed in local memory or the first error is known; bounds as put. This default answers
  // kUnavailable (a transport that cannot read remote memory).
  virtual void get(PeerId peer, std::vector<GetOp> ops, Completion done);
  // `done` runs when every put submitted to `peer` before this call is remotely complete.
  virtual void flush(PeerId peer, Completion done) = 0;
  // Sends a small message now (not ordered behind puts: send it from a flush's completion to put
  // it behind the data). `bytes` is copied.
  virtual void notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) = 0;

  virtual void set_notification_handler(NotificationHandler handler) = 0;
  virtual void set_peer_failure_handler(PeerFailureHandler handler) = 0;

  // Runs `fn` on the progress thread, soon / after `delay`.
  virtual void post(std::function<void()> fn) = 0;
  virtual void post_after(std::chrono::nanoseconds delay, std::function<void()> fn) = 0;

  // Bytes of puts this transport wants in flight to keep its pipeline busy (a staged transport:
  // enough to fill every receiver slot and queue the next round), 0 for no wish. The
  // TransferScheduler's automatic window takes at least this.
  virtual uint64_t suggested_inflight_bytes() const { return 0; }
};

}  // namespace kvf::fabric
