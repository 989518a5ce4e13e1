// RemoteStore: one daemon's part in the cluster's shared store. It serves the node's peers over a
// PeerServer on the node's control_port (lookup, grant, release, drop, pull) from the local
// ChunkStore, and brings entries from a peer into the local store: the holder grants leases (so
// the bytes can be neither evicted nor reused meanwhile) and names where they lie in its arena;
// this daemon reserves room in its own arena and reads the bytes with one-sided UCX gets straight
// from the holder's arena into its own, checks each entry's checksum, commits, and releases the
// leases. No chunk byte passes through either daemon's heap. Move = fetch, then drop at the source.
//
// Thread-safe: every method may be called from several threads (HTTP handlers, peer requests);
// fetches from one peer are serialized on that peer's link.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvf/fabric/topology.h"
#include "kvf/fabric/ucx_transport.h"
#include "kvf/protocol/chunk_key.h"
#include "kvf/store/chunk_store.h"
#include "peer_link.h"

namespace kvf::daemon {

// How the bytes cross: the holder writes them into this node's arena (put, the default: UCX's tcp
// transport has native puts but emulates gets, measured at 0.22-0.28 GB/s against ~2 GB/s for
// puts on this machine's loopback), or this node reads them from the holder's arena (get: as
// fast where the link has native RDMA reads, e.g. rc/dc verbs).
enum class FetchBy : uint8_t { kPut, kGet };

struct RemoteStoreOptions {
  std::string node;                            // this node's name in the topology
  std::string listen_host;                     // empty: the node's address
  std::optional<uint16_t> listen_port;         // unset: the node's control_port; 0: any free port
  std::chrono::milliseconds deadline{30'000};  // a whole fetch (grant, gets, release)
  std::chrono::milliseconds lookup_deadline{500};
  FetchBy fetch_by = FetchBy::kPut;
  fabric::UcxTransportOptions ucx;
};

struct FetchResult {
  uint64_t fetched = 0;                       // entries now stored here that came over the link
  uint64_t already_here = 0;                  // entries this node held already (not fetched again)
  uint64_t bytes = 0;                         // bytes that came over the link
  std::vector<protocol::ChunkKey> not_found;  // the holder does not have them
  double seconds = 0;                         // grant to release, as this node saw it
  double transfer_seconds = 0;                // of which the bytes crossing (the holder's puts, or gets)
};

struct PeerLookup {
  std::string node;
  size_t matched = 0;  // leading keys the peer holds
  Status status;       // a peer that did not answer
};

class RemoteStore {
 public:
  // `topology` and `store` must outlive this object; the store's arena must be registered with
  // `ucx` (so peers can read it and gets can land in it).
  static Result<std::unique_ptr<RemoteStore>> create(std::shared_ptr<gpudirect::UcxContext> ucx,
                                                     const fabric::Topology& topology,
                                                     store::ChunkStore& store, RemoteStoreOptions options);
  ~RemoteStore();

  uint16_t port() const;  // where peers reach this daemon

  // Asks every other node of the topology how much of `keys` it holds (in parallel, bounded by
  // lookup_deadline): peers that do not answer come back with their error.
  std::vector<PeerLookup> lookup_peers(const std::vector<protocol::ChunkKey>& keys);
  // Brings `keys` from node `from` into this node's store.
  Result<FetchResult> fetch(const std::string& from, const std::vector<protocol::ChunkKey>& keys);
  // Entries from node `from` to node `to` (either may be this node, or neither); without `copy`
  // they are removed at `from` once they are committed at `to`.
  Result<FetchResult> move(const std::string& from, const std::string& to,
                           const std::vector<protocol::ChunkKey>& keys, bool copy);

 private:
  struct Link {  // a peer's UCX endpoint and its imported arena, made on first fetch
    std::mutex mutex;
    std::string ucx_address;  // hex, as the peer sent it
    fabric::PeerId peer = 0;
    fabric::RemoteRegionId region = 0;
    bool connected = false;
  };
  RemoteStore(std::shared_ptr<gpudirect::UcxContext> ucx, const fabric::Topology& topology,
              store::ChunkStore& store, RemoteStoreOptions options,
              std::unique_ptr<fabric::UcxTransport> transport);
  nlohmann::json handle(const nlohmann::json& request);
  nlohmann::json grant(const nlohmann::json& request);
  nlohmann::json release(const nlohmann::json& request);
  nlohmann::json push(const nlohmann::json& request);
  // The peer link to a UCX address (made on first use; also for peers that only fetch from here).
  Result<Link*> link_to_address(Link& link, const std::string& ucx_address_hex, const nlohmann::json& region);
  const fabric::NodeSpec* node_named(const std::string& name, Status& error) const;
  // A request to `node`'s peer port, addressed to it by name.
  Result<nlohmann::json> ask(const fabric::NodeSpec& node, nlohmann::json request,
                             std::chrono::milliseconds deadline) const;
  Link& link_for(const std::string& node);

  std::shared_ptr<gpudirect::UcxContext> ucx_;
  const fabric::Topology& topology_;
  store::ChunkStore& store_;
  RemoteStoreOptions options_;
  std::unique_ptr<fabric::UcxTransport> transport_;
  std::unique_ptr<PeerServer> server_;
  std::mutex links_mutex_;
  std::unordered_map<std::string, std::unique_ptr<Link>> links_;
  // Leases granted to peers, by id, until pushed or released; a peer that vanished in between
  // loses them after twice the fetch deadline (the next grant sweeps them).
  struct Grant {
    store::Lease lease;
    std::chrono::steady_clock::time_point granted;
  };
  std::mutex grants_mutex_;
  std::unordered_map<uint64_t, Grant> grants_;
  std::atomic<uint64_t> next_client_{1};
};

}  // namespace kvf::daemon
