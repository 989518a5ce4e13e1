// The topology loader: the shipped examples load clean, and each kind of mistake is reported once,
// at the exact line:col, naming the field.
#include <initializer_list>
#include <string>
#include <string_view>

#include "catch.h"
#include "kvf/fabric/topology.h"

using kvf::fabric::EngineRole;
using kvf::fabric::load_topology_string;
using kvf::fabric::TopologyLoad;
using kvf::fabric::TransportKind;

namespace {

// Raw strings below start with a newline so that the YAML's line 1 is the line after R"(.
TopologyLoad load(std::string_view yaml) {
  if (!yaml.empty() && yaml.front() == '\n') yaml.remove_prefix(1);
  return load_topology_string(yaml, "t.yaml");
}

std::string all_problems(const TopologyLoad& result) {
  std::string out;
  for (const auto& p : result.problems) out += p.to_string() + "\n";
  return out;
}

// Exactly one problem, at line:col, whose message holds every part.
void require_single(const TopologyLoad& result, int line, int column,
                    std::initializer_list<std::string_view> parts) {
  INFO(all_problems(result));
  REQUIRE_FALSE(result.topology.has_value());
  REQUIRE(result.problems.size() == 1);
  const auto& p = result.problems[0];
  CHECK(p.file == "t.yaml");
  CHECK(p.line == line);
  CHECK(p.column == column);
  for (std::string_view part : parts) CHECK(p.message.find(part) != std::string::npos);
}

// Some problem at line:col holds every part.
bool has_problem(const TopologyLoad& result, int line, int column,
                 std::initializer_list<std::string_view> parts) {
  for (const auto& p : result.problems) {
    if (p.line != line || p.column != column) continue;
    bool all = true;
    for (std::string_view part : parts) all = all && p.message.find(part) != std::string::npos;
    if (all) return true;
  }
  return false;
}

constexpr std::string_view kMinimal = R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
)";

}  // namespace

TEST_CASE("the example topologies load clean") {
  for (const char* name : {"local.yaml", "two-node.yaml", "gpu-2x.yaml"}) {
    const std::string path = std::string(KVF_SOURCE_DIR) + "/examples/topologies/" + name;
    const TopologyLoad result = kvf::fabric::load_topology_file(path);
    INFO(path << "\n" << all_problems(result));
    REQUIRE(result.problems.empty());
    REQUIRE(result.topology.has_value());
    CHECK(result.topology->source_file == path);
  }
}

TEST_CASE("local.yaml is the embedded demo topology") {
  const auto result =
      kvf::fabric::load_topology_file(std::string(KVF_SOURCE_DIR) + "/examples/topologies/local.yaml");
  REQUIRE(result.topology.has_value());
  const auto& t = *result.topology;
  REQUIRE(t.nodes.size() == 1);
  CHECK(t.nodes[0].name == "local");
  CHECK(t.nodes[0].address == "127.0.0.1");
  CHECK(t.nodes[0].gpus.empty());
  CHECK(t.nodes[0].store_dram_bytes == (1ULL << 30));
  CHECK(t.transport_preference == std::vector<TransportKind>{TransportKind::kUcx});
  const auto* model = t.find_model("llama-3-8b");
  REQUIRE(model != nullptr);
  CHECK(model->layout.kind == kvf::protocol::KvLayoutKind::kFlashAttention);
  CHECK(model->layout.num_layers == 32);
  CHECK(model->layout.kv_heads == 8);
  CHECK(model->layout.head_dim == 128);
  CHECK(model->layout.dtype_bytes == 2);
  CHECK(model->layout.block_tokens == 16);
  CHECK(uint64_t{model->layout.num_blocks} * model->layout.block_tokens >= 8192 + 1024);
  CHECK(model->chunk_tokens == 256);
  const auto* prefill = t.find_engine("prefill0");
  const auto* decode = t.find_engine("decode0");
  REQUIRE(prefill != nullptr);
  REQUIRE(decode != nullptr);
  CHECK(prefill->role == EngineRole::kPrefill);
  CHECK(prefill->port == 17100);
  CHECK_FALSE(prefill->gpu.has_value());
  CHECK(decode->role == EngineRole::kDecode);
  CHECK(decode->port == 17101);
  CHECK(t.find_engine("nope") == nullptr);
}

TEST_CASE("gpu-2x.yaml places the engines on GPUs 0 and 1") {
  const auto result =
      kvf::fabric::load_topology_file(std::string(KVF_SOURCE_DIR) + "/examples/topologies/gpu-2x.yaml");
  REQUIRE(result.topology.has_value());
  const auto& t = *result.topology;
  CHECK(t.nodes.at(0).gpus == std::vector<int>{0, 1});
  CHECK(t.find_engine("prefill0")->gpu == 0);
  CHECK(t.find_engine("decode0")->gpu == 1);
  CHECK(t.transport_preference ==
        std::vector<TransportKind>{TransportKind::kCudaIpc, TransportKind::kNccl, TransportKind::kUcx});
}

TEST_CASE("omitted keys take their documented defaults") {
  const auto result = load(kMinimal);
  INFO(all_problems(result));
  REQUIRE(result.topology.has_value());
  const auto& t = *result.topology;
  CHECK(t.cluster == "c");
  CHECK(t.nodes[0].control_port == 17000);
  CHECK(t.nodes[0].http_port == 17080);
  CHECK(t.nodes[0].store_dram_bytes == (1ULL << 30));
  CHECK(t.nodes[0].store_ssd_bytes == 0);
  CHECK(t.models.empty());
  CHECK(t.engines.empty());
  CHECK(t.auth_token.empty());
  CHECK(t.ucx_tls.empty());
  CHECK(t.transport_preference == std::vector<TransportKind>{TransportKind::kLocal, TransportKind::kCudaIpc,
                                                             TransportKind::kUcx, TransportKind::kNccl});
}

TEST_CASE("every key of the schema is read") {
  const auto result = load(R"(
cluster: full
auth:
  token: s3cret
transports:
  preference: [nccl, local]
  ucx_tls: tcp,self
models:
  - name: ds
    layout: {kind: mla, layers: 61, head_dim: 576, dtype: fp8, block_tokens: 64, blocks: 100}
    chunk_tokens: 128
nodes:
  - name: g
    address: gpu-01.rack2
    control_port: 7000
    http_port: 7001
    gpus: [0, 1, 2, 3]
    nics:
      - name: mlx5_0
        gpus: [0, 1]
      - name: mlx5_1
        gpus: [2, 3]
    store:
      dram: 64GiB
      ssd: 2 TiB
      ssd_path: /mnt/nvme/kvf
engines:
  - {name: e, node: g, role: both, model: ds, gpu: 3, port: 7002, kv_blocks: 4096}
)");
  INFO(all_problems(result));
  REQUIRE(result.topology.has_value());
  const auto& t = *result.topology;
  CHECK(t.auth_token == "s3cret");
  CHECK(t.ucx_tls == "tcp,self");
  CHECK(t.transport_preference == std::vector<TransportKind>{TransportKind::kNccl, TransportKind::kLocal});
  const auto& m = t.models.at(0);
  CHECK(m.layout.kind == kvf::protocol::KvLayoutKind::kMla);
  CHECK(m.layout.kv_heads == 1);
  CHECK(m.layout.dtype_bytes == 1);
  CHECK(m.chunk_tokens == 128);
  const auto& n = t.nodes.at(0);
  CHECK(n.control_port == 7000);
  CHECK(n.http_port == 7001);
  REQUIRE(n.nics.size() == 2);
  CHECK(n.nics[1].name == "mlx5_1");
  CHECK(n.nics[1].gpu_affinity == std::vector<int>{2, 3});
  CHECK(n.store_dram_bytes == 64ULL << 30);
  CHECK(n.store_ssd_bytes == 2ULL << 40);
  CHECK(n.store_ssd_path == "/mnt/nvme/kvf");
  const auto& e = t.engines.at(0);
  CHECK(e.role == EngineRole::kBoth);
  CHECK(e.gpu == 3);
  CHECK(e.kv_blocks == 4096);
}

TEST_CASE("an unknown key is a problem, with the allowed keys when nothing is close") {
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
    flavour: large
)"),
                 5, 5, {"unknown key 'flavour' in nodes[0]", "allowed: name, address"});
}

TEST_CASE("a typo'd key is reported with a suggestion, and the key it missed as missing") {
  const auto result = load(R"(
cluster: c
nodes:
  - name: a
    adress: 10.0.0.1
)");
  INFO(all_problems(result));
  REQUIRE(result.problems.size() == 2);
  CHECK(has_problem(result, 3, 5, {"nodes[0]: missing required key 'address'"}));
  CHECK(has_problem(result, 4, 5, {"unknown key 'adress' in nodes[0] (did you mean 'address'?)"}));
}

TEST_CASE("a typo'd top-level key is reported at the top level") {
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
transport:
  preference: [ucx]
)"),
                 5, 1, {"unknown key 'transport' at the top level (did you mean 'transports'?)"});
}

TEST_CASE("a wrong type names the field and what was found") {
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
    control_port: abc
)"),
                 5, 19, {"nodes[0].control_port: expected an integer 1..65535, got \"abc\""});
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
    http_port: 65536
)"),
                 5, 16, {"nodes[0].http_port", "65536"});
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
    gpus: 0
)"),
                 5, 11, {"nodes[0].gpus: expected a list, got \"0\""});
  require_single(load(R"(
cluster: c
nodes:
  name: a
)"),
                 3, 3, {"nodes: expected a list, got a map"});
  require_single(load(R"(
cluster: [a, b]
nodes:
  - name: a
    address: 10.0.0.1
)"),
                 1, 10, {"cluster: expected a non-empty string, got a list"});
}

TEST_CASE("an empty value is reported at its key") {
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address:
)"),
                 4, 5, {"nodes[0].address: expected a non-empty string, got null"});
}

TEST_CASE("missing required keys are reported at the map that lacks them") {
  require_single(load(R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 8, dtype: fp16, block_tokens: 16, blocks: 4}
nodes:
  - name: a
    address: 10.0.0.1
engines:
  - name: e
    node: a
    role: prefill
    model: m
)"),
                 9, 5, {"engines[0]: missing required key 'port'"});
  require_single(load(R"(
nodes:
  - name: a
    address: 10.0.0.1
)"),
                 1, 1, {"missing required key 'cluster' at the top level"});
  require_single(load("cluster: c\n"), 1, 1, {"missing required key 'nodes'"});
  require_single(load("cluster: c\nnodes: []\n"), 2, 8, {"nodes: at least one node is required"});
}

TEST_CASE("duplicate names and duplicate keys are problems") {
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
  - name: a
    address: 10.0.0.2
)"),
                 5, 11, {"nodes[1].name: duplicate node name 'a'", "nodes[0].name (line 3)"});
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
    address: 10.0.0.2
)"),
                 5, 5, {"duplicate key 'address' in nodes[0]"});
}

TEST_CASE("an engine must reference a defined node and model") {
  const auto result = load(R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 8, dtype: fp16, block_tokens: 16, blocks: 4}
nodes:
  - name: node-a
    address: 10.0.0.1
engines:
  - name: e
    node: node-b
    role: decode
    model: llama
    port: 17100
)");
  INFO(all_problems(result));
  REQUIRE(result.problems.size() == 2);
  CHECK(has_problem(result, 10, 11, {"engines[0].node: no node named 'node-b' (did you mean 'node-a'?)"}));
  CHECK(has_problem(result, 12, 12, {"engines[0].model: no model named 'llama' (defined: m)"}));
}

TEST_CASE("an engine's gpu must be one of its node's gpus") {
  require_single(load(R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 8, dtype: fp16, block_tokens: 16, blocks: 4}
nodes:
  - name: a
    address: 10.0.0.1
    gpus: [0, 1]
engines:
  - {name: e, node: a, role: prefill, model: m, gpu: 2, port: 17100}
)"),
                 10, 54, {"engines[0].gpu: GPU 2 is not one of node 'a' gpus [0, 1]"});
}

TEST_CASE("a NIC's gpu affinity must name the node's gpus") {
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
    gpus: [0, 1]
    nics:
      - {name: mlx5_0, gpus: [1, 4]}
)"),
                 7, 34, {"nodes[0].nics[0].gpus[1]: GPU 4 is not one of node 'a' gpus [0, 1]"});
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
    gpus: [0, 0]
)"),
                 5, 15, {"nodes[0].gpus[1]: GPU 0 is listed twice"});
}

TEST_CASE("ports on one address must all differ") {
  require_single(
      load(R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 8, dtype: fp16, block_tokens: 16, blocks: 4}
nodes:
  - name: a
    address: 10.0.0.1
    control_port: 17100
engines:
  - {name: e0, node: a, role: prefill, model: m, port: 17100}
)"),
      10, 56, {"engines[0].port: port 17100 on 10.0.0.1 is already used by nodes[0].control_port (line 8)"});
  require_single(load(R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 8, dtype: fp16, block_tokens: 16, blocks: 4}
nodes:
  - name: a
    address: 10.0.0.1
engines:
  - {name: e0, node: a, role: prefill, model: m, port: 17100}
  - {name: e1, node: a, role: decode, model: m, port: 17100}
)"),
                 10, 55, {"engines[1].port: port 17100", "engines[0].port (line 9)"});
  // Two node entries on one host share its ports, defaults included.
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 127.0.0.1
  - name: b
    address: 127.0.0.1
    control_port: 18000
    http_port: 18080
  - name: c
    address: 127.0.0.1
    control_port: 17000
    http_port: 19080
)"),
                 11, 19,
                 {"nodes[2].control_port: port 17000 on 127.0.0.1", "nodes[0].control_port (default 17000)"});
  // Different hosts may reuse ports.
  const auto ok = load(R"(
cluster: c
nodes:
  - {name: a, address: 10.0.0.1}
  - {name: b, address: 10.0.0.2}
)");
  CHECK(ok.problems.empty());
}

TEST_CASE("store sizes take binary units or bytes") {
  auto with_dram = [](const std::string& dram) {
    return load("cluster: c\nnodes:\n  - name: a\n    address: 10.0.0.1\n    store:\n      dram: " + dram +
                "\n");
  };
  CHECK(with_dram("512MiB").topology->nodes[0].store_dram_bytes == 512ULL << 20);
  CHECK(with_dram("\"2 GiB\"").topology->nodes[0].store_dram_bytes == 2ULL << 30);
  CHECK(with_dram("1073741824").topology->nodes[0].store_dram_bytes == 1ULL << 30);
  CHECK(with_dram("0").topology->nodes[0].store_dram_bytes == 0);
  require_single(with_dram("64GB"), 6, 13, {"nodes[0].store.dram: bad size \"64GB\"", "ambiguous", "GiB"});
  require_single(with_dram("12XiB"), 6, 13, {"nodes[0].store.dram", "unknown unit 'XiB'"});
  require_single(with_dram("lots"), 6, 13, {"nodes[0].store.dram", "expected a size like 64GiB"});
  require_single(with_dram("-1"), 6, 13, {"nodes[0].store.dram"});
  require_single(with_dram("99999999999TiB"), 6, 13, {"nodes[0].store.dram", "overflows"});
  require_single(with_dram("{a: 1}"), 6, 13, {"nodes[0].store.dram: expected a size", "got a map"});
}

TEST_CASE("an SSD tier needs both a size and a path") {
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
    store: {ssd: 1TiB}
)"),
                 5, 12, {"nodes[0].store.ssd_path: required when store.ssd is set"});
}

TEST_CASE("store.placement names a policy file and an interval; it needs a store") {
  auto with = [](const std::string& store) {
    return load("cluster: c\nnodes:\n  - name: a\n    address: 10.0.0.1\n    store: " + store + "\n");
  };
  const auto on = with("{placement: {policy: p.json, interval_ms: 500}}");
  REQUIRE(on.topology);
  CHECK(on.topology->nodes[0].store_placement_policy == "p.json");
  CHECK(on.topology->nodes[0].store_placement_interval_ms == 500);
  const auto defaults = with("{placement: {policy: /etc/kvf/p.json}}");
  REQUIRE(defaults.topology);
  CHECK(defaults.topology->nodes[0].store_placement_interval_ms == kvf::fabric::kDefaultPlacementIntervalMs);
  const auto off = with("{dram: 1GiB}");
  REQUIRE(off.topology);
  CHECK(off.topology->nodes[0].store_placement_policy.empty());
  require_single(with("{placement: {interval_ms: 500}}"), 5, 24,
                 {"nodes[0].store.placement", "missing required key 'policy'"});
  require_single(with("{placement: {policy: p.json, interval_ms: 5}}"), 5, 54,
                 {"nodes[0].store.placement.interval_ms"});
  require_single(with("{placement: {policy: p.json, every: 5}}"), 5, 41,
                 {"nodes[0].store.placement", "every"});
  require_single(with("{dram: 0, placement: {policy: p.json}}"), 5, 33,
                 {"nodes[0].store.placement: set, but store.dram is 0"});
}

TEST_CASE("the store socket defaults per node and must be an absolute path a socket can hold") {
  auto with_socket = [](const std::string& socket) {
    return load(
        "cluster: c\nnodes:\n  - name: a\n    address: 10.0.0.1\n    store:\n      socket: " + socket + "\n");
  };
  const TopologyLoad defaulted = load(kMinimal);
  REQUIRE(defaulted.topology);
  CHECK(defaulted.topology->nodes[0].store_socket == "/tmp/kvfabric-a.sock");
  CHECK(with_socket("/run/kvf/a.sock").topology->nodes[0].store_socket == "/run/kvf/a.sock");
  require_single(with_socket("kvf.sock"), 6, 15, {"nodes[0].store.socket: expected an absolute path"});
  require_single(with_socket("/" + std::string(120, 'x')), 6, 15,
                 {"nodes[0].store.socket", "at most 107 bytes", "121"});
  // Two node entries on one address cannot share a socket (the second daemon could not bind it).
  const TopologyLoad clash = load(R"(
cluster: c
nodes:
  - name: a
    address: 127.0.0.1
    store: {socket: /tmp/s.sock}
  - name: b
    address: 127.0.0.1
    http_port: 17081
    control_port: 17001
    store: {socket: /tmp/s.sock}
)");
  require_single(clash, 10, 21, {"nodes[1].store.socket: store socket /tmp/s.sock on 127.0.0.1", "nodes[0]"});
}

TEST_CASE("chunk_tokens must be a multiple of block_tokens") {
  require_single(load(R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 8, dtype: fp16, block_tokens: 16, blocks: 4}
    chunk_tokens: 100
nodes:
  - {name: a, address: 10.0.0.1}
)"),
                 5, 19, {"models[0].chunk_tokens: 100 is not a multiple of layout.block_tokens (16)"});
  // The default 256 counts too, and the message says so.
  require_single(load(R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_infer, layers: 2, kv_heads: 2, head_dim: 8, dtype: fp16, block_tokens: 48, blocks: 4}
nodes:
  - {name: a, address: 10.0.0.1}
)"),
                 3, 5,
                 {"models[0].chunk_tokens: the default 256 is not a multiple of layout.block_tokens (48)"});
}

TEST_CASE("layout fields are checked") {
  require_single(load(R"(
cluster: c
models:
  - name: m
    layout:
      kind: flash_attention
      layers: 2
      kv_heads: 2
      head_dim: 8
      dtype: bf17
      block_tokens: 16
      blocks: 4
nodes:
  - {name: a, address: 10.0.0.1}
)"),
                 9, 14,
                 {"models[0].layout.dtype: expected one of bf16, fp16, fp8, fp32, got \"bf17\"",
                  "did you mean 'bf16'?"});
  require_single(load(R"(
cluster: c
models:
  - name: m
    layout: {kind: mla, layers: 2, kv_heads: 8, head_dim: 512, dtype: bf16, block_tokens: 64, blocks: 4}
nodes:
  - {name: a, address: 10.0.0.1}
)"),
                 4, 46, {"models[0].layout.kv_heads: must be 1 for kind mla"});
  require_single(load(R"(
cluster: c
models:
  - name: m
    layout: {kind: paged, layers: 2, kv_heads: 8, head_dim: 512, dtype: bf16, block_tokens: 64, blocks: 4}
nodes:
  - {name: a, address: 10.0.0.1}
)"),
                 4, 20, {"models[0].layout.kind: expected one of flash_attention, flash_infer, mla"});
}

TEST_CASE("addresses must be host names or IP literals") {
  auto with_address = [](const std::string& address) {
    return load("cluster: c\nnodes:\n  - name: a\n    address: " + address + "\n");
  };
  CHECK(with_address("gpu-01.rack2").problems.empty());
  CHECK(with_address("\"::1\"").problems.empty());
  CHECK(with_address("fe80::1").problems.empty());
  require_single(with_address("10.0.0.300"), 4, 14, {"nodes[0].address: not a valid IPv4 address"});
  require_single(with_address("\"host:7000\""), 4, 14, {"nodes[0].address", "without a port"});
  require_single(with_address("http://host"), 4, 14, {"nodes[0].address", "not a URL"});
  require_single(with_address("\"two words\""), 4, 14, {"nodes[0].address", "host name"});
}

TEST_CASE("transport preferences name known transports once") {
  const auto result = load(R"(
cluster: c
transports:
  preference: [ucx, rdma, ucx]
nodes:
  - {name: a, address: 10.0.0.1}
)");
  INFO(all_problems(result));
  REQUIRE(result.problems.size() == 2);
  CHECK(has_problem(result, 3, 21, {"transports.preference[1]: expected one of ucx, cuda_ipc, nccl, local"}));
  CHECK(has_problem(result, 3, 27, {"transports.preference[2]: transport 'ucx' is listed twice"}));
  require_single(load("cluster: c\ntransports: {preference: []}\nnodes: [{name: a, address: 10.0.0.1}]\n"), 2,
                 26, {"transports.preference: must name at least one transport"});
}

TEST_CASE("a YAML syntax error is one problem at the parser's mark") {
  require_single(load(R"(
cluster: c
nodes:
  - name: a
    address: [10.0.0.1
)"),
                 5, 1, {"YAML syntax error"});
  require_single(load("cluster: c\n  nodes: x\n"), 2, 8, {"YAML syntax error"});
}

TEST_CASE("an empty document is a problem") {
  require_single(load(""), 1, 1, {"empty document"});
  require_single(load("# only a comment\n"), 1, 1, {"empty document"});
  require_single(load("---\n"), 1, 1, {"empty document"});
}

TEST_CASE("the document must be a map") {
  require_single(load("just words\n"), 1, 1, {"top level: expected a map", "got \"just words\""});
  require_single(load("- cluster: c\n- nodes: []\n"), 1, 1, {"top level: expected a map", "got a list"});
}

TEST_CASE("a second YAML document is refused") {
  require_single(load("cluster: c\nnodes: [{name: a, address: 10.0.0.1}]\n---\ncluster: d\n"), 4, 1,
                 {"only one YAML document"});
}

TEST_CASE("all problems are collected, in file order") {
  const auto result = load(R"(
cluster: c
nodes:
  - name: a
    address: 10.0.0.1
    control_port: x
  - name: b
    address: 10.0.0.2
    http_port: y
engines:
  - {name: e, node: zz, role: prefil, model: m, port: 1}
)");
  INFO(all_problems(result));
  REQUIRE(result.problems.size() == 5);
  CHECK(result.problems[0].message.find("nodes[0].control_port") == 0);
  CHECK(result.problems[1].message.find("nodes[1].http_port") == 0);
  CHECK(result.problems[2].message.find("engines[0].node") == 0);
  CHECK(result.problems[3].message.find("engines[0].role") == 0);
  CHECK(result.problems[4].message.find("engines[0].model") == 0);
  for (size_t i = 1; i < result.problems.size(); ++i) {
    CHECK(std::pair(result.problems[i - 1].line, result.problems[i - 1].column) <=
          std::pair(result.problems[i].line, result.problems[i].column));
  }
}

TEST_CASE("problems print as FILE:LINE:COL: message") {
  kvf::fabric::TopologyProblem p{"x.yaml", 3, 7, "nodes[0].name: bad"};
  CHECK(p.to_string() == "x.yaml:3:7: nodes[0].name: bad");
  p.line = 0;
  CHECK(p.to_string() == "x.yaml: nodes[0].name: bad");
}

TEST_CASE("a missing file is one problem without a position") {
  const auto result = kvf::fabric::load_topology_file("/nonexistent/kvf-topology.yaml");
  REQUIRE(result.problems.size() == 1);
  CHECK(result.problems[0].line == 0);
  CHECK(result.problems[0].message.find("cannot read topology file") != std::string::npos);
}

TEST_CASE("hostile input never throws") {
  std::string deep(20000, '[');
  CHECK_NOTHROW(load(deep));
  CHECK_FALSE(load(deep).problems.empty());
  CHECK_NOTHROW(load(std::string("\0\xff\xfe: \x01", 6)));
  CHECK_NOTHROW(load("&a [*a]"));
  CHECK_FALSE(load("cluster: !!binary x\nnodes: {{{\n").problems.empty());
}
