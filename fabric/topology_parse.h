// Private to the topology loader: turns the YAML document into a Topology field by field. Every
// list keeps one entry per YAML item (default-filled where broken) so that indices, and thus the
// paths the later cross-checks report, stay those of the file.
#pragma once

#include <yaml-cpp/yaml.h>

#include "kvf/fabric/topology.h"
#include "topology_reader.h"

namespace kvf::fabric::topo {

// Defaults, documented in docs/topology.md.
inline constexpr uint16_t kDefaultControlPort = 17000;
inline constexpr uint16_t kDefaultHttpPort = 17080;
inline constexpr uint64_t kDefaultStoreDramBytes = 1ULL << 30;
inline constexpr uint32_t kDefaultChunkTokens = 256;
// Longest path a Unix socket address holds (sockaddr_un.sun_path less its terminating NUL).
inline constexpr size_t kMaxSocketPath = 107;
// /tmp/kvfabric-<name>.sock, with characters outside [A-Za-z0-9._-] of the name replaced by '_'.
std::string default_store_socket(const std::string& node_name);

// Reads root (which must be a map) into a Topology; problems go to ctx.
Topology read_topology(const YAML::Node& root, ReadContext& ctx);

}  // namespace kvf::fabric::topo
