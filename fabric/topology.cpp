#include "kvf/fabric/topology.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "topology_parse.h"
#include "topology_reader.h"
#include "topology_validate.h"

namespace kvf::fabric {

std::string TopologyProblem::to_string() const {
  if (line <= 0) return file + ": " + message;
  return file + ":" + std::to_string(line) + ":" + std::to_string(std::max(column, 1)) + ": " + message;
}

std::string_view engine_role_name(EngineRole role) {
  switch (role) {
    case EngineRole::kPrefill:
      return "prefill";
    case EngineRole::kDecode:
      return "decode";
    case EngineRole::kBoth:
      return "both";
  }
  return "unknown";
}

std::string_view transport_kind_name(TransportKind kind) {
  switch (kind) {
    case TransportKind::kUcx:
      return "ucx";
    case TransportKind::kCudaIpc:
      return "cuda_ipc";
    case TransportKind::kNccl:
      return "nccl";
    case TransportKind::kLocal:
      return "local";
  }
  return "unknown";
}

namespace {

template <typename Spec>
const Spec* find_by_name(const std::vector<Spec>& specs, std::string_view name) {
  auto it = std::find_if(specs.begin(), specs.end(), [&](const Spec& s) { return s.name == name; });
  return it == specs.end() ? nullptr : &*it;
}

TopologyLoad single_problem(const std::string& file, int line, int column, std::string message) {
  TopologyLoad load;
  load.problems.push_back(TopologyProblem{file, line, column, std::move(message)});
  return load;
}

// Parses, reads and validates; may throw what yaml-cpp throws (the callers catch it).
TopologyLoad load(std::string_view yaml, const std::string& display_name) {
  topo::ReadContext ctx(display_name);
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(std::string(yaml));
  } catch (const YAML::ParserException& e) {
    const bool known = !e.mark.is_null();
    return single_problem(display_name, known ? e.mark.line + 1 : 0, known ? e.mark.column + 1 : 0,
                          "YAML syntax error: " + e.msg);
  }
  // An empty file is a mistake (a wrong path or a truncated copy), never "no nodes, fine".
  if (documents.empty() || documents[0].IsNull()) {
    return single_problem(display_name, 1, 1,
                          "empty document: expected a map with at least 'cluster' and 'nodes'");
  }
  if (documents.size() > 1) {
    // A second document would otherwise be ignored without a word.
    const topo::Pos pos = topo::pos_of(documents[1], {1, 1});
    ctx.report("", pos,
               "only one YAML document is allowed; this file has " + std::to_string(documents.size()));
  }
  const YAML::Node& root = documents[0];
  if (!root.IsMap()) {
    ctx.report("", topo::pos_of(root, {1, 1}),
               "top level: expected a map with keys cluster, nodes, ..., got " + topo::describe(root));
    return TopologyLoad{std::nullopt, ctx.take_problems()};
  }
  Topology topology = topo::read_topology(root, ctx);
  topo::validate_topology(topology, ctx);
  if (!ctx.ok()) return TopologyLoad{std::nullopt, ctx.take_problems()};
  topology.source_file = display_name;
  return TopologyLoad{std::move(topology), {}};
}

}  // namespace

const NodeSpec* Topology::find_node(std::string_view name) const {
  return find_by_name(nodes, name);
}
const ModelSpec* Topology::find_model(std::string_view name) const {
  return find_by_name(models, name);
}
const EngineSpec* Topology::find_engine(std::string_view name) const {
  return find_by_name(engines, name);
}

TopologyLoad load_topology_string(std::string_view yaml, const std::string& display_name) {
  // The loader's contract is "never throws": whatever yaml-cpp or the allocator raise becomes a
  // problem the operator can read.
  try {
    return load(yaml, display_name);
  } catch (const YAML::Exception& e) {
    const bool known = !e.mark.is_null();
    return single_problem(display_name, known ? e.mark.line + 1 : 0, known ? e.mark.column + 1 : 0,
                          "YAML error: " + e.msg);
  } catch (const std::exception& e) {
    return single_problem(display_name, 0, 0, std::string("internal error while loading: ") + e.what());
  }
}

TopologyLoad load_topology_file(const std::string& path) {
  try {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) {
      return single_problem(path, 0, 0, "cannot read topology file: it is a directory");
    }
    std::ifstream in(path, std::ios::binary);
    if (!in) {
      return single_problem(path, 0, 0, std::string("cannot read topology file: ") + std::strerror(errno));
    }
    std::ostringstream text;
    text << in.rdbuf();
    if (in.bad()) {
      return single_problem(path, 0, 0, std::string("cannot read topology file: ") + std::strerror(errno));
    }
    return load_topology_string(text.str(), path);
  } catch (const std::exception& e) {
    return single_problem(path, 0, 0, std::string("cannot read topology file: ") + e.what());
  }
}

}  // namespace kvf::fabric
