#include "node_daemon.h"

#include <pthread.h>
#include <signal.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>

#include <spdlog/spdlog.h>

#include "kvf/control/http_server.h"
#include "kvf/control/placement_service.h"
#include "kvf/control/store_control_api.h"
#include "kvf/fabric/topology.h"
#include "kvf/fabric/version.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/gpudirect/ucx_context.h"
#include "kvf/store/chunk_store.h"
#include "kvf/store/shared_arena.h"
#include "remote_store.h"
#include "store_reaper.h"
#include "store_rpc_server.h"

namespace kvf::daemon {

namespace {

std::string mib(uint64_t bytes) {
  return std::to_string(bytes >> 20) + " MiB";
}

}  // namespace

int run_node_daemon(const NodeDaemonOptions& options) {
  // Before any thread starts, so that every thread inherits the mask and only sigwait below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  const fabric::TopologyLoad load = fabric::load_topology_file(options.topology_file);
  if (!load.topology) {
    for (const auto& problem : load.problems) spdlog::error("{}", problem.to_string());
    spdlog::error("{} is not a valid topology ({} problem(s)); check it with kvfabricd --check-topology",
                  options.topology_file, load.problems.size());
    return kExitBadInput;
  }
  const fabric::Topology& topology = *load.topology;
  const fabric::NodeSpec* node = topology.find_node(options.node);
  if (node == nullptr) {
    std::string names;
    for (const auto& n : topology.nodes) names += (names.empty() ? "" : ", ") + n.name;
    spdlog::error("no node '{}' in {} (nodes: {})", options.node, options.topology_file, names);
    return kExitBadInput;
  }
  if (node->store_dram_bytes == 0) {
    spdlog::error("node '{}' has store.dram 0 (no prefix store): kvfabricd has nothing to serve on it yet",
                  node->name);
    return kExitBadInput;
  }
  spdlog::info("kvfabricd {}: node '{}' of cluster '{}' ({})", fabric::version(), node->name,
               topology.cluster, options.topology_file);

  // The placement policy before anything starts: a bad file is a bad input, reported at once.
  // A relative path is relative to the topology file, as the file's author wrote it.
  std::optional<control::PlacementPolicy> placement_policy;
  std::string policy_path = node->store_placement_policy;
  if (!policy_path.empty() && policy_path.front() != '/') {
    policy_path = (std::filesystem::path(topology.source_file).parent_path() / policy_path).string();
  }
  if (!policy_path.empty()) {
    auto policy = control::read_placement_policy(policy_path);
    if (!policy.ok()) {
      spdlog::error("store.placement: {}", policy.status().to_string());
      return kExitBadInput;
    }
    placement_policy = std::move(policy.value());
  }

  // The arena first: everything else points into it.
  auto made = store::SharedArena::create(node->name, node->store_dram_bytes, options.huge_pages);
  if (!made.ok()) {
    spdlog::error("store arena: {}", made.status().to_string());
    return kExitFailed;
  }
  auto arena = std::make_unique<store::SharedArena>(std::move(made.value()));
  spdlog::info("store arena: {} ({} bytes); {}", arena->name(), arena->size(), arena->huge_pages_note());

  // UCX registration lets the peers read the arena and remote fetches land in it.
  std::shared_ptr<gpudirect::UcxContext> ucx;
  if (options.peers) {
    if (!topology.ucx_tls.empty()) setenv("UCX_TLS", topology.ucx_tls.c_str(), 0);  // the user's wins
    auto made_ucx = gpudirect::UcxContext::create();
    if (!made_ucx.ok()) {
      spdlog::error("ucx: {}", made_ucx.status().to_string());
      return kExitFailed;
    }
    ucx = made_ucx.value();
  }
  auto region = gpudirect::MemoryRegion::register_external(ucx, arena->data(), arena->size(),
                                                           protocol::MemoryKind::kSharedMemory);
  if (!region.ok()) {
    spdlog::error("store arena region: {}", region.status().to_string());
    return kExitFailed;
  }
  store::ChunkStoreOptions store_options;
  store_options.reservation_timeout = options.reservation_timeout;
  store_options.lease_timeout = options.lease_timeout;
  // The SSD tier: one file of store.ssd bytes in the store.ssd_path directory (the topology
  // validator requires both or neither). Evicted chunks spill there and come back on acquire.
  if (node->store_ssd_bytes > 0) {
    store::SsdTierOptions ssd;
    ssd.path = node->store_ssd_path + "/kvfabric-" + node->name + ".ssd";
    ssd.capacity = node->store_ssd_bytes;
    ssd.io = options.ssd_io;
    store_options.ssd = ssd;
    // Arena blocks on 4 KiB boundaries: spills and promotions then move a chunk's whole blocks by
    // O_DIRECT straight from and into the arena, with no bounce copy (at most 4 KiB per chunk lost).
    store_options.alignment = store::kSsdBlock;
  }
  auto created = store::ChunkStore::create(std::move(region.value()), std::move(store_options));
  if (!created.ok()) {
    spdlog::error("store: {}", created.status().to_string());
    return kExitFailed;
  }
  std::unique_ptr<store::ChunkStore> chunk_store = std::move(created.value());
  spdlog::info("store: {} of {}; reservation timeout {} ms, lease timeout {} ms, reaper every {} ms",
               mib(chunk_store->stats().capacity_bytes), mib(arena->size()),
               options.reservation_timeout.count(), options.lease_timeout.count(),
               options.reap_interval.count());
  if (const store::SsdTier* tier = chunk_store->ssd_tier()) {
    spdlog::info("ssd tier: {} ({} bytes, {} I/O); evicted chunks spill there", tier->path(),
                 tier->capacity(), tier->io_name());
  } else {
    spdlog::info("ssd tier: none (store.ssd is not set): evicted chunks are dropped");
  }

  StoreRpcServerOptions rpc_options;
  rpc_options.socket_path = options.socket_path.empty() ? node->store_socket : options.socket_path;
  rpc_options.node = node->name;
  rpc_options.arena.arena_name = arena->name();
  rpc_options.arena.backing = arena->backing();
  rpc_options.arena.arena_bytes = arena->size();
  rpc_options.io_threads = options.rpc_threads;
  auto rpc = StoreRpcServer::start(*chunk_store, rpc_options);
  if (!rpc.ok()) {
    spdlog::error("store rpc: {}", rpc.status().to_string());
    return kExitFailed;
  }
  std::unique_ptr<StoreRpcServer> rpc_server = std::move(rpc.value());
  spdlog::info("store rpc: listening on {}", rpc_options.socket_path);

  auto reaper = std::make_unique<StoreReaper>(*chunk_store, options.reap_interval);

  StoreRpcServer* rpc_raw = rpc_server.get();
  std::unique_ptr<control::PlacementService> placement;  // made below, read by /metrics after
  auto api =
      std::make_shared<control::StoreControlApi>(topology, node->name, *chunk_store, [rpc_raw, &placement] {
        return rpc_raw->metrics() + (placement ? placement->metrics() : std::string());
      });
  if (placement_policy) {
    placement = std::make_unique<control::PlacementService>(
        topology, *chunk_store, *api, *placement_policy,
        std::chrono::milliseconds(node->store_placement_interval_ms));
    spdlog::info(
        "placement: re-planning every entry's codec and tier every {} ms with {} ({} codec profiles)",
        node->store_placement_interval_ms, policy_path,
        placement_policy->planner.codecs.size());
  } else {
    spdlog::info("placement: off (store.placement is not set): codecs change only on /compress");
  }
  std::unique_ptr<RemoteStore> remote;
  if (options.peers) {
    RemoteStoreOptions remote_options;
    remote_options.node = node->name;
    remote_options.listen_host = options.http_host;
    remote_options.listen_port = options.peer_port;
    remote_options.fetch_by = options.fetch_by_get ? FetchBy::kGet : FetchBy::kPut;
    auto made_remote = RemoteStore::create(ucx, topology, *chunk_store, remote_options);
    if (made_remote.ok()) {
      remote = std::move(made_remote.value());
    } else {
      // The node's own store still serves its engines; the operator sees why the cluster part is off.
      spdlog::error("peers: {}; serving this node alone (no remote lookups, fetches or moves)",
                    made_remote.status().to_string());
    }
  }
  if (remote) {
    RemoteStore* r = remote.get();
    control::StoreControlApi::Peers peers;
    peers.lookup = [r](const std::vector<protocol::ChunkKey>& keys) {
      std::vector<std::pair<std::string, size_t>> out;
      for (const PeerLookup& p : r->lookup_peers(keys)) {
        if (!p.status.ok()) spdlog::debug("lookup at {}: {}", p.node, p.status.to_string());
        out.emplace_back(p.node, p.matched);
      }
      return out;
    };
    peers.move = [r](const control::MoveRequest& m) -> Result<control::MoveResult> {
      auto moved = r->move(m.from, m.to, m.keys, m.copy);
      if (!moved.ok()) return moved.status();
      return control::MoveResult{moved->fetched + moved->already_here, moved->bytes, moved->not_found};
    };
    api->set_peers(std::move(peers));
    spdlog::info("peers: serving the other nodes on port {} (UCX_TLS={})", remote->port(),
                 std::getenv("UCX_TLS") != nullptr ? std::getenv("UCX_TLS") : "UCX's default");
  }

  control::HttpServerOptions http_options;
  http_options.host = options.http_host.empty() ? node->address : options.http_host;
  http_options.port = options.http_port.value_or(node->http_port);
  auto http = control::HttpControlServer::start(api, http_options);
  if (!http.ok()) {
    spdlog::error("http: {}", http.status().to_string());
    rpc_server->drain(std::chrono::milliseconds(0));
    return kExitFailed;
  }
  std::unique_ptr<control::HttpControlServer> http_server = std::move(http.value());
  spdlog::info("http: listening on {}", http_server->address());
  spdlog::info("ready: node '{}', store socket {}, http {}", node->name, rpc_options.socket_path,
               http_server->address());

  int signal = 0;
  while (sigwait(&stop_signals, &signal) != 0) {
  }
  spdlog::info("stopping on signal {}: draining", signal == SIGTERM ? "SIGTERM" : "SIGINT");

  // Operators first (no new control requests), then engines (finish what is in flight), then the
  // reaper, the store and the arena, in the reverse order of their making.
  http_server->stop();
  http_server.reset();
  placement.reset();  // before the store it re-plans
  remote.reset();     // no peer reads this arena after this
  rpc_server->drain(options.drain_grace);
  rpc_server.reset();
  reaper.reset();
  api.reset();
  const store::StoreStats final_stats = chunk_store->stats();
  chunk_store.reset();
  const std::string arena_name = arena->name();
  arena.reset();  // unmaps and removes the name; engines keep their own mappings until they unmap
  spdlog::info("stopped cleanly: {} entries dropped ({} in the ssd tier), arena {} removed",
               final_stats.entries + final_stats.ssd_entries, final_stats.ssd_entries, arena_name);
  return kExitOk;
}

}  // namespace kvf::daemon
