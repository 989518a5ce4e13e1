// LocalTransport: a Transport between objects of one process (memcpy), for unit tests of the
// logic above transports (plans, scheduler, streams). Not a data path for production: it exists
// so that logic can be tested without sockets. Addresses are names registered in a process-wide
// table. Fault injection: sever() makes a peer fail, stall() makes puts/flushes never complete.
// Thread rules: as Transport.
#pragma once

#include <memory>
#include <string>

#include "kvf/fabric/transport.h"

namespace kvf::fabric {

class LocalTransport final : public Transport {
 public:
  // `name` must be unique in the process while the transport lives.
  static Result<std::unique_ptr<LocalTransport>> create(const std::string& name);
  ~LocalTransport() override;

  std::string_view name() const override { return "local"; }
  std::vector<uint8_t> address() const override;
  Result<PeerId> connect(std::span<const uint8_t> address, const ConnectOptions& options = {}) override;
  Result<RemoteRegionId> import_region(PeerId peer, const protocol::RegionDescriptor& region) override;
  void disconnect(PeerId peer) override;
  void put(PeerId peer, std::vector<PutOp> ops, Completion done) override;
  void flush(PeerId peer, Completion done) override;
  void notify(PeerId peer, std::span<const uint8_t> bytes, Completion done) override;
  void set_notification_handler(NotificationHandler handler) override;
  void set_peer_failure_handler(PeerFailureHandler handler) override;
  void post(std::function<void()> fn) override;
  void post_after(std::chrono::nanoseconds delay, std::function<void()> fn) override;
  uint64_t suggested_inflight_bytes() const override { return suggested_inflight_; }

  // What suggested_inflight_bytes() answers (tests of the scheduler's window); set before use.
  void suggest_inflight(uint64_t bytes) { suggested_inflight_ = bytes; }

  // Fault injection.
  void sever(PeerId peer);           // the peer fails: queued and later ops complete with kPeerLost
  void stall(PeerId peer, bool on);  // puts/flushes to the peer are held and never complete while on

  class Impl;

 private:
  explicit LocalTransport(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
  uint64_t suggested_inflight_ = 0;
};

}  // namespace kvf::fabric
