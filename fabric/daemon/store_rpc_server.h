// StoreRpcServer: kvfabricd's engine-facing side. Accepts engines on a Unix stream socket and serves
// the store RPC (protocol/store_rpc.h) over a ChunkStore, one request at a time per connection, on
// Asio io threads. Each connection is one store client: when it closes (an engine exits or is
// killed) its reservations and leases are freed at once (ChunkStore::drop_client).
// A frame whose header is bad (magic, version, kind, op, size) leaves the stream unsynchronized and
// closes that connection; a frame with a good header and a bad payload gets an error reply and the
// connection stays. Either way only that client is affected.
// Thread rules: start() and drain() from one owner thread; metrics() from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "kvf/protocol/status.h"
#include "kvf/protocol/store_rpc.h"
#include "kvf/store/chunk_store.h"

namespace kvf::daemon {

struct RpcServerState;  // private to store_rpc_server.cpp

struct StoreRpcServerOptions {
  std::string socket_path;
  std::string node;                       // announced in hello
  protocol::store_rpc::HelloReply arena;  // arena name, backing and size announced in hello
  size_t io_threads = 2;
  // A frame whose header has arrived must be complete within this time, else the connection closes.
  std::chrono::milliseconds frame_timeout{10'000};
};

class StoreRpcServer {
 public:
  // Binds the socket (a stale one left by a dead daemon is replaced; one a live daemon serves is
  // an error) and starts serving. `store` must outlive the server.
  static Result<std::unique_ptr<StoreRpcServer>> start(store::ChunkStore& store,
                                                       StoreRpcServerOptions options);
  ~StoreRpcServer();
  StoreRpcServer(const StoreRpcServer&) = delete;
  StoreRpcServer& operator=(const StoreRpcServer&) = delete;

  // Stops accepting and removes the socket file, lets each connection finish the request it is
  // serving, closes them, and waits up to `grace` for that before closing whatever is left. Then
  // joins the io threads. Idempotent.
  void drain(std::chrono::milliseconds grace);

  // Prometheus text: connections and requests.
  std::string metrics() const;

 private:
  explicit StoreRpcServer(std::shared_ptr<RpcServerState> impl);
  std::shared_ptr<RpcServerState> impl_;
};

}  // namespace kvf::daemon
