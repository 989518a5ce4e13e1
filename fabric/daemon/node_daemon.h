// NodeDaemon: what `kvfabricd --topology FILE --node NAME` runs. Creates the node's store arena in
// shared memory, a ChunkStore over it (with the node's SSD tier when the topology gives store.ssd:
// the file <store.ssd_path>/kvfabric-<node>.ssd, preallocated, removed at exit), the store RPC
// server for engines on a Unix socket, the HTTP/JSON control API on the node's http port and the
// reaper; then waits for SIGTERM or SIGINT and drains: the HTTP server stops, the RPC server stops
// accepting, removes its socket and lets each engine's request in progress finish, and the arena's
// name is removed.
// It also joins the other nodes of the topology (RemoteStore on the node's control_port): lookups
// report what the peers hold, and /move fetches entries between arenas over UCX.
// Thread rules: call run_node_daemon from the main thread before any other thread exists (it
// blocks SIGTERM/SIGINT for every thread it starts, then waits for them with sigwait).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "kvf/store/ssd_tier.h"

namespace kvf::daemon {

struct NodeDaemonOptions {
  std::string topology_file;
  std::string node;
  std::string socket_path;            // empty: the node's store.socket from the topology
  std::string http_host;              // empty: the node's address
  std::optional<uint16_t> http_port;  // unset: the node's http_port; 0: any free port
  std::chrono::milliseconds reservation_timeout{30'000};
  std::chrono::milliseconds lease_timeout{30'000};
  std::chrono::milliseconds reap_interval{1'000};
  std::chrono::milliseconds drain_grace{5'000};
  bool huge_pages = true;
  bool peers = true;                  // join the other nodes (RemoteStore)
  bool fetch_by_get = false;          // fetches read the holder's arena (else the holder writes)
  std::optional<uint16_t> peer_port;  // unset: the node's control_port; 0: any free port
  size_t rpc_threads = 1;             // requests take microseconds: a second thread only adds wake-ups
  // The SSD tier's I/O (when the node has store.ssd): O_DIRECT where the file system allows it.
  store::SsdIoMode ssd_io = store::SsdIoMode::kAuto;
};

// Exit codes.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;    // could not start (arena, socket, port) or stopped on an error
inline constexpr int kExitBadInput = 2;  // the topology or the options are wrong

// Runs until SIGTERM or SIGINT; returns the process's exit code.
int run_node_daemon(const NodeDaemonOptions& options);

}  // namespace kvf::daemon
