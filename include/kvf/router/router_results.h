// What RouterClient's calls return. A call that goes to several nodes answers per node: a node that
// is down or refuses is one entry with its error, the others still count. Value types.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/status.h"
#include "kvf/protocol/tier.h"

namespace kvf::router {

using protocol::ChunkKey;

// Where a matched prefix lives, fastest first (the daemon's tier names).
using protocol::Tier;
using protocol::tier_name;

// One node's answer to one call. `reached` tells a node that answered with an error (it is up; the
// status holds its HTTP status and message) from one that is down or timed out.
template <typename T>
struct NodeReply {
  std::string node;
  std::string endpoint;  // "host:port"
  bool reached = false;
  Result<T> result{Status(ErrorCode::kInternal, "not asked")};
};

// A node's held prefix of the query (its store is shared by all its engines).
struct NodeMatch {
  uint32_t query_chunks = 0;
  uint32_t matched_chunks = 0;
  uint64_t matched_tokens = 0;
  Tier tier = Tier::kDram;
};

// One engine (or, with no engine of the model listed on the node, the node's store: engine empty)
// and the prefix it can load.
struct EngineMatch {
  std::string node;
  std::string engine;
  std::string role;  // "prefill", "decode", "both"; empty for a node's store
  uint64_t matched_tokens = 0;
  uint32_t matched_chunks = 0;
  Tier tier = Tier::kDram;
};

struct LookupReport {
  std::string model;
  uint32_t query_chunks = 0;                // full chunks in the query
  std::vector<NodeReply<NodeMatch>> nodes;  // every node asked, in configuration order
  // Engines on nodes that hold a non-empty prefix, best first (the order best_engine uses).
  std::vector<EngineMatch> engines;
  size_t nodes_down() const;  // nodes not reached
};

struct BestEngine {
  EngineMatch engine;
  // false: no node holds any prefix, and `engine` is the fallback (an engine of the model with role
  // decode or both, on a node that answered if one did).
  bool cached = false;
  LookupReport report;  // the lookup it was chosen from
};

struct PinCount {
  uint64_t changed = 0;             // entries pinned (or unpinned) on this node
  std::vector<ChunkKey> not_found;  // keys this node does not hold
};

struct ClearCount {
  uint64_t cleared = 0;
  uint64_t freed_bytes = 0;
};

struct MoveCount {
  uint64_t moved = 0;
  uint64_t bytes = 0;
  std::vector<ChunkKey> not_found;
};

struct NodeHealth {
  bool healthy = false;  // the daemon says "ok"
  std::string version;
  double uptime_s = 0;
  std::vector<std::string> problems;
};

struct TierCounters {
  Tier tier = Tier::kDram;
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t entries = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;
};

struct NodeStats {
  uint64_t entries = 0;
  uint64_t pinned_entries = 0;
  uint64_t leased_entries = 0;
  uint64_t lookups = 0;
  std::vector<TierCounters> tiers;
};

}  // namespace kvf::router
