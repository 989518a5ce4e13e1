// Peer links: how the kvfabricd daemons of a cluster talk to each other (remote lookups, leases
// for remote fetches, moves). TCP on each node's control_port; every message is one frame (u32
// little-endian length, then a JSON object); one reply frame per request. Requests carry "op";
// replies carry either the op's fields or "error" (and "code", an ErrorCode name).
//
// PeerServer: accepts peers and answers each request with `handler` on a small pool of threads
// (a handler may itself wait on another daemon, so one slow request does not stall the others).
// A malformed or oversized frame gets an error reply and the connection is closed; the server
// keeps serving. peer_request: one request on a fresh connection, bounded by a deadline: an
// unreachable or silent peer is an error value (kUnavailable / kTimeout), never a hang.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "kvf/protocol/status.h"

namespace kvf::daemon {

inline constexpr uint32_t kMaxPeerFrameBytes = 16u << 20;

using PeerHandler = std::function<nlohmann::json(const nlohmann::json& request)>;

class PeerServer {
 public:
  // Binds host:port (port 0: any free port; see port()). kUnavailable when the address is taken.
  static Result<std::unique_ptr<PeerServer>> start(const std::string& host, uint16_t port,
                                                   PeerHandler handler, size_t threads = 4);
  ~PeerServer();  // stops accepting, closes connections, joins the threads
  PeerServer(const PeerServer&) = delete;
  PeerServer& operator=(const PeerServer&) = delete;

  uint16_t port() const;

  class Impl;

 private:
  explicit PeerServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Sends `request` to host:port and returns the reply object; a reply with "error" becomes that
// error (its "code" mapped back to an ErrorCode).
Result<nlohmann::json> peer_request(const std::string& host, uint16_t port, const nlohmann::json& request,
                                    std::chrono::milliseconds deadline);

// The reply a handler returns for a failed request.
nlohmann::json peer_error(const Status& status);

}  // namespace kvf::daemon
