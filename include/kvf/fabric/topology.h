// Topology: the parsed and validated YAML that describes a kvfabric cluster (nodes, their
// addresses, GPUs and NICs, models with their KV layouts, engines with role/model/GPU, store
// sizes, transport preferences, auth). Loading never throws: every problem is reported with
// FILE:LINE:COL naming the field. Immutable after loading; safe to share between threads.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvf/protocol/kv_layout.h"
#include "kvf/protocol/status.h"

namespace kvf::fabric {

struct TopologyProblem {
  std::string file;
  int line = 0;                   // 1-based; 0 when unknown
  int column = 0;                 // 1-based; 0 when unknown
  std::string message;            // names the field, e.g. "nodes[1].address: expected host name or IP"
  std::string to_string() const;  // "FILE:LINE:COL: message"
};

struct NicSpec {
  std::string name;               // e.g. mlx5_0
  std::vector<int> gpu_affinity;  // GPUs this NIC serves best
};

struct NodeSpec {
  std::string name;
  std::string address;        // host name or IP the peers use
  uint16_t control_port = 0;  // daemon control (TCP)
  uint16_t http_port = 0;     // daemon HTTP/JSON API
  std::vector<int> gpus;      // CUDA device ordinals on this node
  std::vector<NicSpec> nics;
  uint64_t store_dram_bytes = 0;  // prefix store arena
  uint64_t store_ssd_bytes = 0;
  std::string store_ssd_path;
  std::string store_socket;  // the daemon's Unix socket for engines (default /tmp/kvfabric-<name>.sock)
  // store.placement: the daemon re-plans each entry's codec and tier every interval with the
  // policy file's profiles (control/placement_service.h); empty: it does not.
  std::string store_placement_policy;
  uint32_t store_placement_interval_ms = 0;
};
inline constexpr uint32_t kDefaultPlacementIntervalMs = 10000;

struct ModelSpec {
  std::string name;
  protocol::KvLayoutDesc layout;  // num_blocks here is a default pool size; engines may override
  uint32_t chunk_tokens = 256;
};

enum class EngineRole : uint8_t { kPrefill, kDecode, kBoth };
std::string_view engine_role_name(EngineRole role);

struct EngineSpec {
  std::string name;
  std::string node;  // a NodeSpec name
  EngineRole role = EngineRole::kBoth;
  std::string model;       // a ModelSpec name
  std::optional<int> gpu;  // none: the engine keeps KV in host memory
  uint16_t port = 0;       // the engine's own control port (PD handshakes)
  uint32_t kv_blocks = 0;  // blocks in its KV pool (0: the model's default)
};

enum class TransportKind : uint8_t { kUcx, kCudaIpc, kNccl, kLocal };
std::string_view transport_kind_name(TransportKind kind);

struct Topology {
  std::string source_file;
  std::string cluster;
  std::vector<NodeSpec> nodes;
  std::vector<ModelSpec> models;
  std::vector<EngineSpec> engines;
  std::vector<TransportKind> transport_preference;  // first that both peers support wins
  std::string ucx_tls;     // passed to UCX as UCX_TLS when set (e.g. "tcp", "sm,self")
  std::string auth_token;  // shared token; empty disables auth

  const NodeSpec* find_node(std::string_view name) const;
  const ModelSpec* find_model(std::string_view name) const;
  const EngineSpec* find_engine(std::string_view name) const;
};

// All problems found (empty when the file is valid). Unknown keys, wrong types, missing required
// fields, duplicate names, dangling references (engine -> node/model), port clashes, bad sizes
// ("64GiB", "512MiB" and plain integers accepted) are all problems.
struct TopologyLoad {
  std::optional<Topology> topology;  // set only when problems is empty
  std::vector<TopologyProblem> problems;
};
TopologyLoad load_topology_file(const std::string& path);
TopologyLoad load_topology_string(std::string_view yaml, const std::string& display_name);

}  // namespace kvf::fabric
