#include "topology_parse.h"

#include "topology_address.h"

#include <algorithm>
#include <limits>
#include <string>

namespace kvf::fabric::topo {

namespace {

using protocol::KvLayoutKind;

constexpr int64_t kMaxPort = 65535;
constexpr int64_t kMaxGpu = 1023;
// Generous caps that still keep every layer size far from overflowing 64 bits.
constexpr int64_t kMaxDim = 1 << 20;
constexpr int64_t kMaxU32 = std::numeric_limits<uint32_t>::max();

template <typename T>
void read_int_field(const MapReader& map, std::string_view key, bool required, int64_t min, int64_t max,
                    T& out, ReadContext& ctx) {
  auto node = required ? map.require(key) : map.get(key);
  if (!node) return;
  if (auto v = read_int(*node, map.field(key), min, max, map.pos(), ctx)) out = static_cast<T>(*v);
}

void read_string_field(const MapReader& map, std::string_view key, bool required, std::string& out,
                       ReadContext& ctx) {
  auto node = required ? map.require(key) : map.get(key);
  if (!node) return;
  if (auto v = read_string(*node, map.field(key), map.pos(), ctx)) out = std::move(*v);
}

// A list of GPU ordinals; duplicates are reported since they would double-count a device.
std::vector<int> read_gpu_list(const YAML::Node& node, const std::string& path, Pos fallback,
                               ReadContext& ctx) {
  std::vector<int> gpus;
  ctx.remember(path, pos_of(node, fallback));
  if (!expect_list(node, path, fallback, ctx)) return gpus;
  for (size_t i = 0; i < node.size(); ++i) {
    const std::string item = index_path(path, i);
    auto gpu = read_int(node[i], item, 0, kMaxGpu, pos_of(node, fallback), ctx);
    if (!gpu) continue;
    if (std::find(gpus.begin(), gpus.end(), *gpu) != gpus.end()) {
      ctx.report(item, ctx.where(item), item + ": GPU " + std::to_string(*gpu) + " is listed twice");
      continue;
    }
    gpus.push_back(static_cast<int>(*gpu));
  }
  return gpus;
}

// Calls read_item(item_node, item_path) for each entry that is a map; pushes a default T for
// every entry so indices match the file.
template <typename T, typename ReadItem>
std::vector<T> read_list_of_maps(const YAML::Node& node, const std::string& path, Pos fallback,
                                 ReadContext& ctx, ReadItem read_item) {
  std::vector<T> out;
  if (!expect_list(node, path, fallback, ctx)) return out;
  for (size_t i = 0; i < node.size(); ++i) {
    const std::string item = index_path(path, i);
    const YAML::Node entry = node[i];
    ctx.remember(item, pos_of(entry, pos_of(node, fallback)));
    out.emplace_back();
    if (expect_map(entry, item, pos_of(node, fallback), ctx)) read_item(entry, item, out.back());
  }
  return out;
}

void read_layout(const YAML::Node& node, const std::string& path, Pos fallback,
                 protocol::KvLayoutDesc& layout, ReadContext& ctx) {
  if (!expect_map(node, path, fallback, ctx)) return;
  MapReader map(node, path, {"kind", "layers", "kv_heads", "head_dim", "dtype", "block_tokens", "blocks"},
                ctx);
  if (auto kind = map.require("kind")) {
    // Same order as protocol::KvLayoutKind.
    if (auto i = read_choice(*kind, map.field("kind"), {"flash_attention", "flash_infer", "mla"}, map.pos(),
                             ctx)) {
      layout.kind = static_cast<KvLayoutKind>(*i);
    }
  }
  const bool mla = layout.kind == KvLayoutKind::kMla;
  read_int_field(map, "layers", true, 1, kMaxDim, layout.num_layers, ctx);
  // MLA keeps one latent vector per token, so one "head" is implied.
  if (mla) layout.kv_heads = 1;
  read_int_field(map, "kv_heads", !mla, 1, kMaxDim, layout.kv_heads, ctx);
  if (mla && layout.kv_heads != 1 && !ctx.broken(map.field("kv_heads"))) {
    ctx.report(map.field("kv_heads"), ctx.where(map.field("kv_heads")),
               map.field("kv_heads") + ": must be 1 for kind mla (the latent is one head), got " +
                   std::to_string(layout.kv_heads));
  }
  read_int_field(map, "head_dim", true, 1, kMaxDim, layout.head_dim, ctx);
  if (auto dtype = map.require("dtype")) {
    constexpr uint32_t kBytes[] = {2, 2, 1, 4};
    if (auto i = read_choice(*dtype, map.field("dtype"), {"bf16", "fp16", "fp8", "fp32"}, map.pos(), ctx)) {
      layout.dtype_bytes = kBytes[*i];
    }
  }
  read_int_field(map, "block_tokens", true, 1, kMaxDim, layout.block_tokens, ctx);
  read_int_field(map, "blocks", true, 1, kMaxU32, layout.num_blocks, ctx);

  // The pool must be addressable with 64-bit offsets (2^63, so signed offsets work too).
  const uint64_t factors[] = {layout.kind == KvLayoutKind::kMla ? 1u : 2u,
                              layout.num_blocks,
                              layout.block_tokens,
                              layout.kv_heads,
                              layout.head_dim,
                              layout.dtype_bytes};
  uint64_t bytes = 1;
  for (uint64_t f : factors) {
    if (f == 0) return;  // a field is missing or broken, already reported
    if (bytes > (uint64_t{1} << 63) / f) {
      ctx.report(path, map.pos(), path + ": one layer's KV pool would exceed 2^63 bytes");
      return;
    }
    bytes *= f;
  }
}

void read_model(const YAML::Node& node, const std::string& path, ModelSpec& model, ReadContext& ctx) {
  MapReader map(node, path, {"name", "layout", "chunk_tokens"}, ctx);
  read_string_field(map, "name", true, model.name, ctx);
  model.layout = {};
  if (auto layout = map.require("layout"))
    read_layout(*layout, map.field("layout"), map.pos(), model.layout, ctx);
  model.chunk_tokens = kDefaultChunkTokens;
  read_int_field(map, "chunk_tokens", false, 1, kMaxDim, model.chunk_tokens, ctx);

  // Chunks are stored and loaded as whole blocks, so a chunk must not end inside a block.
  const std::string chunk_path = map.field("chunk_tokens");
  const std::string block_path = map.field("layout.block_tokens");
  const uint32_t block = model.layout.block_tokens;
  if (block != 0 && !ctx.broken(chunk_path) && !ctx.broken(block_path) && model.chunk_tokens % block != 0) {
    const bool defaulted = !map.get("chunk_tokens");
    ctx.report(chunk_path, defaulted ? map.pos() : ctx.where(chunk_path),
               chunk_path + ": " + (defaulted ? "the default " : "") + std::to_string(model.chunk_tokens) +
                   " is not a multiple of layout.block_tokens (" + std::to_string(block) + ")" +
                   (defaulted ? "; set chunk_tokens" : ""));
  }
}

void read_nic(const YAML::Node& node, const std::string& path, NicSpec& nic, ReadContext& ctx) {
  MapReader map(node, path, {"name", "gpus"}, ctx);
  read_string_field(map, "name", true, nic.name, ctx);
  if (auto gpus = map.get("gpus")) nic.gpu_affinity = read_gpu_list(*gpus, map.field("gpus"), map.pos(), ctx);
}

// store.placement: kvfabricd re-plans codecs and tiers itself (control/placement_service.h).
void read_placement(const YAML::Node& node, const std::string& path, Pos fallback, NodeSpec& spec,
                    ReadContext& ctx) {
  if (!expect_map(node, path, fallback, ctx)) return;
  MapReader map(node, path, {"policy", "interval_ms"}, ctx);
  read_string_field(map, "policy", true, spec.store_placement_policy, ctx);
  spec.store_placement_interval_ms = kDefaultPlacementIntervalMs;
  read_int_field(map, "interval_ms", false, 100, 86400000, spec.store_placement_interval_ms, ctx);
}

void read_store(const YAML::Node& node, const std::string& path, Pos fallback, NodeSpec& spec,
                ReadContext& ctx) {
  if (!expect_map(node, path, fallback, ctx)) return;
  MapReader map(node, path, {"dram", "ssd", "ssd_path", "socket", "placement"}, ctx);
  if (auto dram = map.get("dram")) {
    if (auto bytes = read_size(*dram, map.field("dram"), map.pos(), ctx)) spec.store_dram_bytes = *bytes;
  }
  if (auto ssd = map.get("ssd")) {
    if (auto bytes = read_size(*ssd, map.field("ssd"), map.pos(), ctx)) spec.store_ssd_bytes = *bytes;
  }
  read_string_field(map, "ssd_path", false, spec.store_ssd_path, ctx);
  std::string socket;
  read_string_field(map, "socket", false, socket, ctx);
  if (!socket.empty()) {
    const std::string field = map.field("socket");
    if (socket.front() != '/') {
      ctx.report(field, ctx.where(field), field + ": expected an absolute path, got \"" + socket + "\"");
    } else if (socket.size() > kMaxSocketPath) {
      ctx.report(field, ctx.where(field),
                 field + ": a Unix socket path holds at most " + std::to_string(kMaxSocketPath) +
                     " bytes, this one has " + std::to_string(socket.size()));
    } else {
      spec.store_socket = socket;
    }
  }
  if (auto placement = map.get("placement")) {
    read_placement(*placement, map.field("placement"), map.pos(), spec, ctx);
    if (!spec.store_placement_policy.empty() && spec.store_dram_bytes == 0) {
      ctx.report(map.field("placement"), ctx.where(map.field("placement")),
                 map.field("placement") + ": set, but store.dram is 0 (this node has no store to place)");
    }
  }
  // An SSD tier needs both halves; one without the other is a half-finished edit.
  if (spec.store_ssd_bytes > 0 && spec.store_ssd_path.empty() && !ctx.broken(map.field("ssd_path"))) {
    ctx.report(map.field("ssd_path"), map.pos(),
               map.field("ssd_path") + ": required when store.ssd is set (the directory for the SSD tier)");
  }
  if (spec.store_ssd_bytes == 0 && !spec.store_ssd_path.empty() && !ctx.broken(map.field("ssd"))) {
    ctx.report(map.field("ssd"), ctx.where(map.field("ssd_path")),
               map.field("ssd") + ": ssd_path is set but ssd (the tier's size) is missing or 0");
  }
}

void read_node(const YAML::Node& node, const std::string& path, NodeSpec& spec, ReadContext& ctx) {
  MapReader map(node, path, {"name", "address", "control_port", "http_port", "gpus", "nics", "store"}, ctx);
  read_string_field(map, "name", true, spec.name, ctx);
  read_string_field(map, "address", true, spec.address, ctx);
  if (auto why = spec.address.empty() ? std::nullopt : address_problem(spec.address)) {
    const std::string field = map.field("address");
    ctx.report(field, ctx.where(field), field + ": " + *why + ", got \"" + spec.address + "\"");
    spec.address.clear();
  }
  spec.control_port = kDefaultControlPort;
  spec.http_port = kDefaultHttpPort;
  read_int_field(map, "control_port", false, 1, kMaxPort, spec.control_port, ctx);
  read_int_field(map, "http_port", false, 1, kMaxPort, spec.http_port, ctx);
  if (auto gpus = map.get("gpus")) spec.gpus = read_gpu_list(*gpus, map.field("gpus"), map.pos(), ctx);
  if (auto nics = map.get("nics")) {
    spec.nics = read_list_of_maps<NicSpec>(
        *nics, map.field("nics"), map.pos(), ctx,
        [&](const YAML::Node& n, const std::string& p, NicSpec& nic) { read_nic(n, p, nic, ctx); });
  }
  spec.store_dram_bytes = kDefaultStoreDramBytes;
  if (auto store = map.get("store")) read_store(*store, map.field("store"), map.pos(), spec, ctx);
  if (spec.store_socket.empty() && !ctx.broken(map.field("store") + ".socket")) {
    spec.store_socket = default_store_socket(spec.name);
  }
}

void read_engine(const YAML::Node& node, const std::string& path, EngineSpec& engine, ReadContext& ctx) {
  MapReader map(node, path, {"name", "node", "role", "model", "gpu", "port", "kv_blocks"}, ctx);
  read_string_field(map, "name", true, engine.name, ctx);
  read_string_field(map, "node", true, engine.node, ctx);
  if (auto role = map.require("role")) {
    // Same order as EngineRole.
    if (auto i = read_choice(*role, map.field("role"), {"prefill", "decode", "both"}, map.pos(), ctx)) {
      engine.role = static_cast<EngineRole>(*i);
    }
  }
  read_string_field(map, "model", true, engine.model, ctx);
  if (auto gpu = map.get("gpu")) {
    if (auto v = read_int(*gpu, map.field("gpu"), 0, kMaxGpu, map.pos(), ctx))
      engine.gpu = static_cast<int>(*v);
  }
  read_int_field(map, "port", true, 1, kMaxPort, engine.port, ctx);
  read_int_field(map, "kv_blocks", false, 1, kMaxU32, engine.kv_blocks, ctx);
}

void read_transports(const YAML::Node& node, Pos fallback, Topology& topo, ReadContext& ctx) {
  if (!expect_map(node, "transports", fallback, ctx)) return;
  MapReader map(node, "transports", {"preference", "ucx_tls"}, ctx);
  if (auto found = map.get("preference")) {
    // Const: yaml-cpp's non-const operator[] may reshape the node it indexes.
    const YAML::Node pref = *found;
    const std::string path = map.field("preference");
    if (expect_list(pref, path, map.pos(), ctx)) {
      topo.transport_preference.clear();
      for (size_t i = 0; i < pref.size(); ++i) {
        const std::string item = index_path(path, i);
        // Same order as TransportKind.
        auto kind = read_choice(pref[i], item, {"ucx", "cuda_ipc", "nccl", "local"}, pos_of(pref), ctx);
        if (!kind) continue;
        const auto t = static_cast<TransportKind>(*kind);
        if (std::find(topo.transport_preference.begin(), topo.transport_preference.end(), t) !=
            topo.transport_preference.end()) {
          ctx.report(item, ctx.where(item),
                     item + ": transport '" + std::string(transport_kind_name(t)) + "' is listed twice");
          continue;
        }
        topo.transport_preference.push_back(t);
      }
      if (pref.size() == 0) {
        ctx.report(path, ctx.where(path), path + ": must name at least one transport");
      }
    }
  }
  if (auto tls = map.get("ucx_tls")) {
    const std::string path = map.field("ucx_tls");
    if (auto v = read_string(*tls, path, map.pos(), ctx)) {
      if (v->find_first_of(" \t") != std::string::npos) {
        ctx.report(path, ctx.where(path),
                   path + ": UCX_TLS is a comma-separated list without spaces, got \"" + *v + "\"");
      } else {
        topo.ucx_tls = *v;
      }
    }
  }
}

void read_auth(const YAML::Node& node, Pos fallback, Topology& topo, ReadContext& ctx) {
  if (!expect_map(node, "auth", fallback, ctx)) return;
  MapReader map(node, "auth", {"token"}, ctx);
  read_string_field(map, "token", true, topo.auth_token, ctx);
}

}  // namespace

Topology read_topology(const YAML::Node& root, ReadContext& ctx) {
  Topology topo;
  // Without a transports section: in-process first, then same-host GPU copies, then the network.
  topo.transport_preference = {TransportKind::kLocal, TransportKind::kCudaIpc, TransportKind::kUcx,
                               TransportKind::kNccl};
  MapReader map(root, "", {"cluster", "auth", "transports", "models", "nodes", "engines"}, ctx);
  read_string_field(map, "cluster", true, topo.cluster, ctx);
  if (auto auth = map.get("auth")) read_auth(*auth, map.pos(), topo, ctx);
  if (auto transports = map.get("transports")) read_transports(*transports, map.pos(), topo, ctx);
  if (auto models = map.get("models")) {
    topo.models = read_list_of_maps<ModelSpec>(
        *models, "models", map.pos(), ctx,
        [&](const YAML::Node& n, const std::string& p, ModelSpec& m) { read_model(n, p, m, ctx); });
  }
  if (auto nodes = map.require("nodes")) {
    topo.nodes = read_list_of_maps<NodeSpec>(
        *nodes, "nodes", map.pos(), ctx,
        [&](const YAML::Node& n, const std::string& p, NodeSpec& s) { read_node(n, p, s, ctx); });
    if (nodes->IsSequence() && nodes->size() == 0) {
      ctx.report("nodes", pos_of(*nodes, map.pos()), "nodes: at least one node is required");
    }
  }
  if (auto engines = map.get("engines")) {
    topo.engines = read_list_of_maps<EngineSpec>(
        *engines, "engines", map.pos(), ctx,
        [&](const YAML::Node& n, const std::string& p, EngineSpec& e) { read_engine(n, p, e, ctx); });
  }
  return topo;
}

std::string default_store_socket(const std::string& node_name) {
  std::string safe;
  for (char c : node_name) {
    const bool keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '.' || c == '_' || c == '-';
    safe += keep ? c : '_';
  }
  std::string path = "/tmp/kvfabric-" + safe + ".sock";
  // Very long node names: keep the path a socket address can hold.
  if (path.size() > kMaxSocketPath) path = path.substr(0, kMaxSocketPath - 5) + ".sock";
  return path;
}

}  // namespace kvf::fabric::topo
