#include "topology_validate.h"

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "topology_suggest.h"

namespace kvf::fabric::topo {

namespace {

std::string gpu_list(const std::vector<int>& gpus) {
  std::string out = "[";
  for (size_t i = 0; i < gpus.size(); ++i) out += (i ? ", " : "") + std::to_string(gpus[i]);
  return out + "]";
}

std::string line_of(Pos pos) {
  return pos.line > 0 ? " (line " + std::to_string(pos.line) + ")" : "";
}

// Reports every name after the first that repeats one before it.
template <typename Spec>
void check_unique_names(const std::vector<Spec>& specs, const std::string& list, std::string_view what,
                        ReadContext& ctx) {
  std::map<std::string, std::string, std::less<>> first;  // name -> its path
  for (size_t i = 0; i < specs.size(); ++i) {
    const std::string path = index_path(list, i) + ".name";
    if (specs[i].name.empty() || ctx.broken(path)) continue;
    auto [it, inserted] = first.emplace(specs[i].name, path);
    if (!inserted) {
      ctx.report(path, ctx.where(path),
                 path + ": duplicate " + std::string(what) + " name '" + specs[i].name + "', first used by " +
                     it->second + line_of(ctx.where(it->second)));
    }
  }
}

// "no node named 'x' (did you mean 'y'?)" or "(known: a, b)".
template <typename Spec>
std::string unknown_reference(std::string_view what, const std::string& name,
                              const std::vector<Spec>& specs) {
  std::vector<std::string_view> names;
  for (const Spec& s : specs) {
    if (!s.name.empty() && std::find(names.begin(), names.end(), s.name) == names.end())
      names.push_back(s.name);
  }
  std::string out = "no " + std::string(what) + " named '" + name + "'";
  if (auto suggestion = closest_match(name, names))
    return out + " (did you mean '" + std::string(*suggestion) + "'?)";
  std::string known;
  for (std::string_view n : names) known += (known.empty() ? "" : ", ") + std::string(n);
  return out + (known.empty() ? " (none are defined)" : " (defined: " + known + ")");
}

void check_nics(const Topology& topo, ReadContext& ctx) {
  for (size_t n = 0; n < topo.nodes.size(); ++n) {
    const NodeSpec& node = topo.nodes[n];
    const std::string node_path = index_path("nodes", n);
    check_unique_names(node.nics, node_path + ".nics", "NIC", ctx);
    if (ctx.broken(node_path + ".gpus")) continue;
    for (size_t k = 0; k < node.nics.size(); ++k) {
      // A broken list had entries dropped, so indices would no longer match the file.
      const std::string gpus_path = index_path(node_path + ".nics", k) + ".gpus";
      if (ctx.broken(gpus_path)) continue;
      for (size_t g = 0; g < node.nics[k].gpu_affinity.size(); ++g) {
        const int gpu = node.nics[k].gpu_affinity[g];
        if (std::find(node.gpus.begin(), node.gpus.end(), gpu) != node.gpus.end()) continue;
        const std::string item = index_path(gpus_path, g);
        ctx.report(item, ctx.where(item),
                   item + ": GPU " + std::to_string(gpu) + " is not one of node '" + node.name + "' gpus " +
                       gpu_list(node.gpus));
      }
    }
  }
}

void check_engine_references(const Topology& topo, ReadContext& ctx) {
  for (size_t e = 0; e < topo.engines.size(); ++e) {
    const EngineSpec& engine = topo.engines[e];
    const std::string path = index_path("engines", e);
    const std::string node_path = path + ".node";
    const NodeSpec* node = nullptr;
    if (!engine.node.empty() && !ctx.broken(node_path)) {
      node = topo.find_node(engine.node);
      if (!node) {
        ctx.report(node_path, ctx.where(node_path),
                   node_path + ": " + unknown_reference("node", engine.node, topo.nodes));
      }
    }
    const std::string model_path = path + ".model";
    if (!engine.model.empty() && !ctx.broken(model_path) && !topo.find_model(engine.model)) {
      ctx.report(model_path, ctx.where(model_path),
                 model_path + ": " + unknown_reference("model", engine.model, topo.models));
    }
    const std::string gpu_path = path + ".gpu";
    if (node && engine.gpu && !ctx.broken(gpu_path)) {
      const size_t node_index = static_cast<size_t>(node - topo.nodes.data());
      if (!ctx.broken(index_path("nodes", node_index) + ".gpus") &&
          std::find(node->gpus.begin(), node->gpus.end(), *engine.gpu) == node->gpus.end()) {
        ctx.report(gpu_path, ctx.where(gpu_path),
                   gpu_path + ": GPU " + std::to_string(*engine.gpu) + " is not one of node '" + node->name +
                       "' gpus " + gpu_list(node->gpus));
      }
    }
  }
}

struct PortUse {
  uint16_t port;
  std::string path;
  Pos pos;
  bool defaulted;  // not written in the file: the message must say where it came from

  std::string label() const { return path + (defaulted ? " (default " + std::to_string(port) + ")" : ""); }
};

// Daemons and engines that share an address share its port space, even across node entries.
void check_ports(const Topology& topo, ReadContext& ctx) {
  std::map<std::string, std::vector<PortUse>> by_address;
  auto add = [&](const std::string& address, uint16_t port, const std::string& path) {
    if (port == 0 || ctx.broken(path)) return;
    by_address[address].push_back(PortUse{port, path, ctx.where(path), !ctx.find(path).has_value()});
  };
  for (size_t n = 0; n < topo.nodes.size(); ++n) {
    const NodeSpec& node = topo.nodes[n];
    const std::string path = index_path("nodes", n);
    if (node.address.empty()) continue;
    add(node.address, node.control_port, path + ".control_port");
    add(node.address, node.http_port, path + ".http_port");
  }
  for (size_t e = 0; e < topo.engines.size(); ++e) {
    const EngineSpec& engine = topo.engines[e];
    const NodeSpec* node = engine.node.empty() ? nullptr : topo.find_node(engine.node);
    if (!node || node->address.empty()) continue;
    add(node->address, engine.port, index_path("engines", e) + ".port");
  }
  for (auto& [address, uses] : by_address) {
    // Report the later use in the file, pointing back at the first.
    std::stable_sort(uses.begin(), uses.end(), [](const PortUse& a, const PortUse& b) {
      return std::pair(a.pos.line, a.pos.column) < std::pair(b.pos.line, b.pos.column);
    });
    for (size_t i = 0; i < uses.size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        if (uses[j].port != uses[i].port) continue;
        ctx.report(uses[i].path, uses[i].pos,
                   uses[i].label() + ": port " + std::to_string(uses[i].port) + " on " + address +
                       " is already used by " + uses[j].label() + line_of(uses[j].pos));
        break;
      }
    }
  }
}

// Daemons of node entries on one address share its file system: each needs its own store socket.
void check_sockets(const Topology& topo, ReadContext& ctx) {
  std::map<std::pair<std::string, std::string>, size_t> first;  // (address, socket) -> node index
  for (size_t n = 0; n < topo.nodes.size(); ++n) {
    const NodeSpec& node = topo.nodes[n];
    const std::string path = index_path("nodes", n) + ".store.socket";
    if (node.address.empty() || node.store_socket.empty() || ctx.broken(path)) continue;
    auto [it, fresh] = first.emplace(std::pair(node.address, node.store_socket), n);
    if (fresh) continue;
    const std::string where = ctx.find(path) ? path : index_path("nodes", n) + " (default store.socket)";
    ctx.report(path, ctx.where(ctx.find(path) ? path : index_path("nodes", n)),
               where + ": store socket " + node.store_socket + " on " + node.address +
                   " is already used by " + index_path("nodes", it->second));
  }
}

}  // namespace

void validate_topology(const Topology& topo, ReadContext& ctx) {
  check_unique_names(topo.nodes, "nodes", "node", ctx);
  check_unique_names(topo.models, "models", "model", ctx);
  check_unique_names(topo.engines, "engines", "engine", ctx);
  check_nics(topo, ctx);
  check_engine_references(topo, ctx);
  check_ports(topo, ctx);
  check_sockets(topo, ctx);
}

}  // namespace kvf::fabric::topo
