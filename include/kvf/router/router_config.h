// RouterConfig: what a router's embedded client needs to know about a cluster — the daemons to ask
// (one per node: its HTTP control endpoint), the models (to hash tokens into chunk keys exactly as
// engines do) and the engines (to turn "node N holds the prefix" into "send it to engine E").
// Built from a topology or written by hand. Value type; no shared state.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kvf/fabric/topology.h"
#include "kvf/protocol/status.h"

namespace kvf::router {

// One node's kvfabricd as the router reaches it: its HTTP/JSON control API.
struct DaemonEndpoint {
  std::string node;  // the node's name in the topology (how results name it)
  std::string host;  // host name or IP; names are resolved once, when the client is created
  uint16_t port = 0;
  std::string to_string() const;  // "node a (10.0.0.1:17080)"
};

struct RouterConfig {
  std::vector<DaemonEndpoint> daemons;
  std::vector<fabric::ModelSpec> models;    // empty: lookups send tokens and let each daemon hash them
  std::vector<fabric::EngineSpec> engines;  // empty: best_engine can only name a node

  // Every node of the topology with its address and http_port (a node without an http_port is left
  // out), every model and every engine.
  static RouterConfig from_topology(const fabric::Topology& topology);
  // load_topology_file, then from_topology; every problem of the file in the message.
  static Result<RouterConfig> from_topology_file(const std::string& path);

  const fabric::ModelSpec* find_model(std::string_view name) const;
};

// Time limits. Every call ends by its deadline whatever the daemons do: a node that does not answer
// in time is reported as timed out, never waited for.
struct RouterOptions {
  std::chrono::milliseconds timeout{2000};  // one whole call (connect, send, answer), all nodes at once
  size_t max_reply_bytes = 8u << 20;        // a longer reply is an error of that node
};

}  // namespace kvf::router
