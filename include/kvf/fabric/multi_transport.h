// MultiTransport: several transports behind one, chosen per peer. Its address lists every inner
// transport's address; connect() takes the first inner transport, in this side's order of
// preference, that the peer offers too and that connects (cuda_ipc refuses a peer on another
// host, so such a peer falls through to the next choice, e.g. ucx). Everything about that peer
// (its regions, puts, gets, flushes, notifications) then goes through the chosen transport.
//
// This is how a process offers what it supports (the topology's transport preference, or
// kvfabric-perf --transport cuda_ipc,ucx) and each link uses the best transport both ends share.
//
// Threads: as Transport. The first inner transport's progress thread is this transport's:
// post() runs there, and completions and handlers of the other inner transports are handed to it,
// so a caller sees one thread, as with any transport. Setup calls block as the inner ones do.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kvf/fabric/transport.h"

namespace kvf::fabric {

// The transports an address offers, by name ("ucx", "cuda_ipc", "nccl", "local"): the list of a
// MultiTransport's address, or the one transport that wrote any other address. Never fails: an
// address it cannot read offers "ucx" (what every older build ran).
std::vector<std::string> transports_offered(std::span<const uint8_t> address);

// True when two addresses offer at least one transport in common (ucx and local count as one:
// both move host memory and a receiver cannot tell them apart).
bool transports_can_meet(std::span<const uint8_t> a, std::span<const uint8_t> b);

// What `transport` should be given to connect to a peer whose address is `address`: the entry of a
// MultiTransport's address that `transport` runs (a plain UCX worker must never see the list),
// the whole address otherwise. Empty when the list has nothing `transport` can use.
std::vector<uint8_t> address_for(const Transport& transport, std::span<const uint8_t> address);

class MultiTransport final : public Transport {
 public:
  // `inner`: at least one transport, most preferred first, with distinct names.
  static Result<std::unique_ptr<MultiTransport>> create(std::vector<std::unique_ptr<Transport>> inner);
  ~MultiTransport() override;

  // The inner transports' names joined by commas, e.g. "cuda_ipc,ucx".
  std::string_view name() const override;
  uint64_t suggested_inflight_bytes() const override;  // the largest of the inner transports'
  std::vector<uint8_t> address() const override;
  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options = {}) override;
  // The inner transport a connected peer uses ("" for an unknown peer).
  std::string_view chosen(PeerId peer) const;

  Result<RemoteRegionId> import_region(PeerId peer, const protocol::RegionDescriptor& region) override;
  void disconnect(PeerId peer) override;
  void put(PeerId peer, std::vector<PutOp> ops, Completion done) override;
  void put_after_event(PeerId peer, std::vector<PutOp> ops, void* cuda_event, Completion done) override;
  void get(PeerId peer, std::vector<GetOp> ops, Completion done) override;
  void flush(PeerId peer, Completion done) override;
  void notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) override;
  void set_notification_handler(NotificationHandler handler) override;
  void set_peer_failure_handler(PeerFailureHandler handler) override;
  void post(std::function<void()> fn) override;
  void post_after(std::chrono::nanoseconds delay, std::function<void()> fn) override;

  class Impl;

 private:
  explicit MultiTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::fabric
