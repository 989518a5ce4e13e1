// ControlApi: the operations that operators and routers run against a node's prefix store (lookup,
// pin/unpin, clear, move, compress, health, stats, metrics), as plain request/result structs. The
// HTTP/JSON server (http_server.h) and, later, the binary RPC are two front ends over one ControlApi;
// the daemon plugs its store in behind it. Implementations must be thread-safe: the server calls
// every method from several threads at once. The structs are value types.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/status.h"
#include "kvf/protocol/tier.h"

namespace kvf::control {

using protocol::ChunkKey;

// Where a matched prefix lives, fastest first.
using protocol::Tier;
using protocol::tier_name;

// POST /lookup. A router sends either the prompt's tokens (the node hashes them into chunk keys the
// way its engines do) or the chunk keys it hashed itself (cheaper to send and to check).
struct LookupRequest {
  std::string model;
  std::variant<std::vector<uint32_t>, std::vector<ChunkKey>> query;
  // "scope": "cluster" (default): also what the other nodes hold where this one's prefix is short;
  // "node": this node's store only (a router that asks every node itself).
  bool cluster = true;

  bool by_tokens() const { return std::holds_alternative<std::vector<uint32_t>>(query); }
  const std::vector<uint32_t>& tokens() const { return std::get<std::vector<uint32_t>>(query); }
  const std::vector<ChunkKey>& chunk_keys() const { return std::get<std::vector<ChunkKey>>(query); }
};

// One holder of a prefix of the query: a node's store (engine empty) or one engine on a node.
struct LookupMatch {
  std::string node;
  std::string engine;           // empty: the node's store
  uint64_t matched_tokens = 0;  // length of the held prefix
  uint32_t matched_chunks = 0;
  Tier tier = Tier::kDram;  // the slowest tier the matched chunks sit in
};

struct LookupResult {
  uint32_t query_chunks = 0;         // how many chunk keys the query made
  std::vector<LookupMatch> matches;  // longest prefix first; holders with no match are left out
};

// POST /pin and /unpin. A pinned entry is never evicted until it is unpinned.
struct PinRequest {
  std::vector<ChunkKey> keys;
};

struct PinResult {
  uint64_t changed = 0;             // entries pinned (or unpinned) by this call
  std::vector<ChunkKey> not_found;  // keys the store does not hold
};

// POST /clear: everything, one model's entries, or the listed keys. Pinned entries are cleared too:
// clearing is an operator's explicit act.
struct ClearRequest {
  enum class Scope : uint8_t { kAll, kModel, kKeys };
  Scope scope = Scope::kAll;
  std::string model;           // kModel
  std::vector<ChunkKey> keys;  // kKeys
};

struct ClearResult {
  uint64_t cleared = 0;  // entries removed
  uint64_t freed_bytes = 0;
};

// POST /move: entries from one node's store to another's; copy keeps them at the source too.
struct MoveRequest {
  std::string from;  // node names as in the topology
  std::string to;
  std::vector<ChunkKey> keys;
  bool copy = false;
};

struct MoveResult {
  uint64_t moved = 0;  // entries now at `to`
  uint64_t bytes = 0;
  std::vector<ChunkKey> not_found;
};

// POST /compress: re-encode entries with a codec (protocol/kv_codec.h: identity, zstd, lz4, int8,
// fp8, int4, int2, drop).
struct CompressRequest {
  bool all = false;  // every entry; otherwise `keys`
  std::vector<ChunkKey> keys;
  std::string codec;
};

struct CompressResult {
  uint64_t compressed = 0;  // entries re-encoded
  uint64_t bytes_before = 0;
  uint64_t bytes_after = 0;
  std::vector<ChunkKey> not_found;
  uint64_t unchanged = 0;           // entries already in that codec
  uint64_t failed = 0;              // entries that could not be re-encoded (see errors)
  std::vector<std::string> errors;  // the first few reasons
};

// GET /health. Being unhealthy is an answer, not an error: the server replies 503 with the report.
struct HealthReport {
  bool healthy = true;
  std::string node;
  std::string version;
  double uptime_s = 0;
  std::vector<std::string> problems;  // why not healthy, one line each
};

// GET /stats: counters of one tier of the node's store. A hit is a key found in this tier, a miss
// a key looked for here and not found (so DRAM's misses include what the SSD tier then served).
struct TierStats {
  Tier tier = Tier::kDram;
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t entries = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;   // entries this tier evicted (DRAM's went to the SSD tier, or were dropped)
  uint64_t spills = 0;      // entries moved from DRAM into the SSD tier (the same count in both tiers)
  uint64_t promotions = 0;  // entries moved from the SSD tier back into DRAM (likewise)
};

struct ControlStats {
  std::string node;
  uint64_t entries = 0;  // all tiers
  uint64_t pinned_entries = 0;
  uint64_t leased_entries = 0;
  uint64_t lookups = 0;  // lookup calls served
  std::vector<TierStats> tiers;
};

class ControlApi {
 public:
  virtual ~ControlApi() = default;

  // kInvalidArgument for an unknown model; an empty query matches nothing.
  virtual Result<LookupResult> lookup(const LookupRequest& request) = 0;
  virtual Result<PinResult> pin(const PinRequest& request) = 0;
  virtual Result<PinResult> unpin(const PinRequest& request) = 0;
  virtual Result<ClearResult> clear(const ClearRequest& request) = 0;
  // kNotFound for an unknown node; kUnavailable when the peer cannot be reached now.
  virtual Result<MoveResult> move(const MoveRequest& request) = 0;
  // kInvalidArgument for a codec this node does not have.
  virtual Result<CompressResult> compress(const CompressRequest& request) = 0;
  virtual HealthReport health() = 0;
  virtual Result<ControlStats> stats() = 0;
  // Prometheus text exposition format (version 0.0.4), every line ending in '\n'.
  virtual Result<std::string> metrics() = 0;
};

}  // namespace kvf::control
