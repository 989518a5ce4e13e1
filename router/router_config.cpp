#include "kvf/router/router_config.h"

namespace kvf::router {

std::string DaemonEndpoint::to_string() const {
  return "node " + node + " (" + host + ":" + std::to_string(port) + ")";
}

RouterConfig RouterConfig::from_topology(const fabric::Topology& topology) {
  RouterConfig config;
  for (const auto& node : topology.nodes) {
    if (node.http_port == 0) continue;  // no control API to ask
    config.daemons.push_back(DaemonEndpoint{node.name, node.address, node.http_port});
  }
  config.models = topology.models;
  config.engines = topology.engines;
  return config;
}

Result<RouterConfig> RouterConfig::from_topology_file(const std::string& path) {
  fabric::TopologyLoad load = fabric::load_topology_file(path);
  if (!load.topology) {
    std::string message = "topology " + path + " is not valid:";
    for (const auto& problem : load.problems) message += "\n  " + problem.to_string();
    return Status(ErrorCode::kInvalidArgument, message);
  }
  return from_topology(*load.topology);
}

const fabric::ModelSpec* RouterConfig::find_model(std::string_view name) const {
  for (const auto& model : models) {
    if (model.name == name) return &model;
  }
  return nullptr;
}

}  // namespace kvf::router
