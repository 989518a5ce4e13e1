// RouterClient against real HTTP control servers in this process (HttpControlServer over
// StoreControlApi and a ChunkStore, as kvfabricd serves them): lookup and best_engine across two
// nodes, pin/unpin/clear/stats/health, move's 503 text, a node that is down or never answers
// reported per node within the deadline, and a keep-alive connection the server closed reopened.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "catch.h"
#include "kvf/control/http_server.h"
#include "kvf/control/store_control_api.h"
#include "kvf/fabric/topology.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/router/router_client.h"
#include "kvf/store/chunk_store.h"

using namespace kvf;
using namespace std::chrono_literals;

namespace {

constexpr const char* kTopology = R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
nodes:
  - {name: a, address: 127.0.0.1, control_port: 17000, http_port: 17080}
  - {name: b, address: 127.0.0.1, control_port: 17001, http_port: 17081}
engines:
  - {name: a-prefill, node: a, role: prefill, model: m, port: 17100}
  - {name: a-both, node: a, role: both, model: m, port: 17101}
  - {name: b-decode, node: b, role: decode, model: m, port: 17102}
)";

struct Node {
  std::unique_ptr<store::ChunkStore> store;
  std::unique_ptr<control::HttpControlServer> server;
};

Node start_node(const fabric::Topology& topo, const std::string& name, std::chrono::milliseconds idle = 60s) {
  Node node;
  auto arena = gpudirect::MemoryRegion::allocate_host(nullptr, 1 << 20);
  REQUIRE(arena.ok());
  auto made = store::ChunkStore::create(std::move(arena.value()));
  REQUIRE(made.ok());
  node.store = std::move(made.value());
  control::HttpServerOptions options;
  options.idle_timeout = idle;
  auto server = control::HttpControlServer::start(
      std::make_shared<control::StoreControlApi>(topo, name, *node.store), options);
  REQUIRE(server.ok());
  node.server = std::move(server.value());
  return node;
}

void put(store::ChunkStore& store, const std::vector<protocol::ChunkKey>& keys,
         const protocol::ChunkKey& model = {}) {
  for (const auto& key : keys) {
    auto r = store.reserve(key, 100, 1, model);
    REQUIRE(r.ok());
    REQUIRE(store.commit(key, r->id).ok());
  }
}

std::vector<uint32_t> prompt(size_t n, uint32_t salt = 0) {
  std::vector<uint32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = static_cast<uint32_t>(i * 13 + 5 + salt);
  return t;
}

// A TCP port that listens but never accepts: connects succeed (the backlog) and no answer comes.
struct SilentListener {
  SilentListener() {
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(fd, 8) == 0);
    socklen_t len = sizeof addr;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    port = ntohs(addr.sin_port);
  }
  ~SilentListener() { ::close(fd); }
  int fd = -1;
  uint16_t port = 0;
};

uint16_t closed_port() {
  SilentListener l;  // bound then closed: nothing listens there afterwards
  return l.port;
}

struct Cluster {
  Cluster() {
    auto load = fabric::load_topology_string(kTopology, "t.yaml");
    REQUIRE(load.topology);
    topo = *load.topology;
    a = start_node(topo, "a");
    b = start_node(topo, "b");
    config = router::RouterConfig::from_topology(topo);  // the servers' real ports replace the topology's
    config.daemons = {{"a", "127.0.0.1", a.server->port()}, {"b", "127.0.0.1", b.server->port()}};
  }
  fabric::Topology topo;
  Node a, b;
  router::RouterConfig config;
};

}  // namespace

TEST_CASE("router client: lookup and best_engine pick the node holding the longest prefix") {
  Cluster c;
  router::RouterClient client(c.config);
  const auto tokens = prompt(32 * 4 + 3);
  auto keys = client.chunk_keys("m", tokens);
  REQUIRE(keys.ok());
  REQUIRE(keys->size() == 4);
  put(*c.a.store, {keys->begin(), keys->begin() + 3});  // a holds 3 chunks
  put(*c.b.store, {keys->begin(), keys->begin() + 1});  // b holds 1

  auto report = client.lookup("m", tokens);
  REQUIRE(report.ok());
  CHECK(report->query_chunks == 4);
  REQUIRE(report->nodes.size() == 2);
  CHECK(report->nodes[0].node == "a");
  REQUIRE(report->nodes[0].result.ok());
  CHECK(report->nodes[0].result->matched_tokens == 96);
  CHECK(report->nodes[1].result->matched_tokens == 32);
  CHECK(report->nodes_down() == 0);
  // Both engines on a (both before prefill: it can finish a request alone), then b's.
  REQUIRE(report->engines.size() == 3);
  CHECK(report->engines[0].engine == "a-both");
  CHECK(report->engines[1].engine == "a-prefill");
  CHECK(report->engines[2].engine == "b-decode");
  CHECK(report->engines[2].matched_tokens == 32);

  auto best = client.best_engine("m", tokens);
  REQUIRE(best.ok());
  CHECK(best->cached);
  CHECK(best->engine.engine == "a-both");
  CHECK(best->engine.node == "a");
  CHECK(best->engine.matched_tokens == 96);

  // Only node b asked.
  auto only_b = client.lookup("m", tokens, "b");
  REQUIRE(only_b.ok());
  REQUIRE(only_b->nodes.size() == 1);
  CHECK(only_b->nodes[0].node == "b");
  CHECK_FALSE(client.lookup("m", tokens, "zzz").ok());

  // Nothing cached anywhere: the first decode-or-both engine.
  auto fresh = client.best_engine("m", prompt(40, 1));
  REQUIRE(fresh.ok());
  CHECK_FALSE(fresh->cached);
  CHECK(fresh->engine.engine == "a-both");
  CHECK(fresh->engine.matched_tokens == 0);

  // A client without a topology sends tokens; the daemons hash them the same way.
  router::RouterConfig bare;
  bare.daemons = c.config.daemons;
  router::RouterClient by_tokens(bare);
  auto r2 = by_tokens.lookup("m", tokens);
  REQUIRE(r2.ok());
  CHECK(r2->nodes[0].result->matched_tokens == 96);
  REQUIRE(r2->engines.size() == 2);
  CHECK(r2->engines[0].engine.empty());
  CHECK(r2->engines[0].node == "a");
}

TEST_CASE("router client: clear_model clears that model's entries on every node, and no other's") {
  Cluster c;
  router::RouterClient client(c.config);
  const fabric::ModelSpec& m = *c.topo.find_model("m");
  const protocol::ChunkKey fingerprint = protocol::model_fingerprint(m.name, m.layout);
  auto keys = client.chunk_keys("m", prompt(32 * 3));
  REQUIRE(keys.ok());
  put(*c.a.store, keys.value(), fingerprint);
  put(*c.b.store, std::vector<protocol::ChunkKey>(keys->begin(), keys->begin() + 2), fingerprint);
  // Another model's chunks on both nodes.
  const protocol::ChunkKey other_model{0x07, 0x07e4};
  const std::vector<protocol::ChunkKey> other{{1, 1}, {2, 2}};
  put(*c.a.store, other, other_model);
  put(*c.b.store, other, other_model);

  auto cleared = client.clear_model("m");
  REQUIRE(cleared.ok());
  REQUIRE(cleared->size() == 2);
  CHECK((*cleared)[0].node == "a");
  CHECK((*cleared)[0].result->cleared == 3);
  CHECK((*cleared)[1].result->cleared == 2);
  CHECK((*cleared)[1].result->freed_bytes == 2 * 256);
  CHECK(c.a.store->stats().entries == 2);
  CHECK(c.b.store->stats().entries == 2);
  for (const auto& k : other) {
    CHECK(c.a.store->peek(k).has_value());
    CHECK(c.b.store->peek(k).has_value());
  }
  for (const auto& k : keys.value()) CHECK_FALSE(c.a.store->peek(k).has_value());

  auto unknown = client.clear_model("nope", "b");
  REQUIRE(unknown.ok());
  REQUIRE(unknown->size() == 1);
  REQUIRE_FALSE((*unknown)[0].result.ok());
  CHECK((*unknown)[0].result.status().code() == ErrorCode::kInvalidArgument);
  CHECK((*unknown)[0].result.status().message().find("unknown model 'nope' (the topology has: m)") !=
        std::string::npos);
  CHECK(c.b.store->stats().entries == 2);
}

TEST_CASE("router client: pin, unpin, clear, stats, health, move") {
  Cluster c;
  router::RouterClient client(c.config);
  auto keys = client.chunk_keys("m", prompt(32 * 3));
  REQUIRE(keys.ok());
  put(*c.a.store, keys.value());

  auto pinned = client.pin(keys.value());
  REQUIRE(pinned.ok());
  REQUIRE(pinned->size() == 2);
  CHECK((*pinned)[0].result->changed == 3);
  CHECK((*pinned)[1].result->changed == 0);
  CHECK((*pinned)[1].result->not_found.size() == 3);
  auto stats = client.stats("a");
  REQUIRE(stats.ok());
  REQUIRE(stats->size() == 1);
  CHECK((*stats)[0].result->entries == 3);
  CHECK((*stats)[0].result->pinned_entries == 3);
  auto unpinned = client.unpin(keys.value(), "a");
  REQUIRE(unpinned.ok());
  CHECK((*unpinned)[0].result->changed == 3);

  auto cleared = client.clear_keys(std::span<const protocol::ChunkKey>(keys.value()).first(1), "a");
  REQUIRE(cleared.ok());
  CHECK((*cleared)[0].result->cleared == 1);
  CHECK((*cleared)[0].result->freed_bytes > 0);
  auto all = client.clear_all();
  REQUIRE(all.ok());
  CHECK((*all)[0].result->cleared == 2);
  CHECK((*all)[1].result->cleared == 0);

  auto health = client.health();
  REQUIRE(health.ok());
  CHECK((*health)[0].result->healthy);
  CHECK((*health)[1].reached);

  auto moved = client.move("a", "b", keys.value());
  REQUIRE_FALSE(moved.ok());
  INFO(moved.status().to_string());
  CHECK(moved.status().code() == ErrorCode::kUnavailable);
  CHECK(moved.status().message().find("node a (127.0.0.1:") != std::string::npos);
  CHECK(moved.status().message().find("HTTP 503: move is not available") != std::string::npos);
}

TEST_CASE("router client: a node down or silent is reported per node within the deadline") {
  Cluster c;
  SilentListener silent;
  router::RouterConfig config = c.config;
  config.daemons.push_back({"down", "127.0.0.1", closed_port()});
  config.daemons.push_back({"silent", "127.0.0.1", silent.port});
  router::RouterOptions options;
  options.timeout = 300ms;
  router::RouterClient client(config, options);
  const auto tokens = prompt(64);
  put(*c.b.store, client.chunk_keys("m", tokens).value());

  const auto start = std::chrono::steady_clock::now();
  auto report = client.lookup("m", tokens);
  const auto took = std::chrono::steady_clock::now() - start;
  CHECK(took < 1s);
  REQUIRE(report.ok());
  REQUIRE(report->nodes.size() == 4);
  CHECK(report->nodes_down() == 2);
  CHECK(report->nodes[1].result->matched_tokens == 64);
  CHECK_FALSE(report->nodes[2].reached);
  CHECK(report->nodes[2].result.status().code() == ErrorCode::kPeerLost);
  CHECK_FALSE(report->nodes[3].reached);
  CHECK(report->nodes[3].result.status().code() == ErrorCode::kTimeout);
  auto best = client.best_engine("m", tokens);
  REQUIRE(best.ok());
  CHECK(best->engine.engine == "b-decode");

  // Node a goes away: reported down; b still answers; a back on the same port is used again.
  const uint16_t a_port = c.a.server->port();
  c.a.server->stop();
  c.a.server.reset();
  auto without_a = client.lookup("m", tokens, "a");
  REQUIRE(without_a.ok());
  CHECK_FALSE(without_a->nodes[0].reached);
  control::HttpServerOptions again;
  again.port = a_port;
  auto restarted = control::HttpControlServer::start(
      std::make_shared<control::StoreControlApi>(c.topo, "a", *c.a.store), again);
  REQUIRE(restarted.ok());
  auto back = client.lookup("m", tokens, "a");
  REQUIRE(back.ok());
  CHECK(back->nodes[0].reached);
  CHECK(back->nodes[0].result.ok());
}

TEST_CASE("router client: a keep-alive connection the daemon closed while idle is reopened") {
  auto load = fabric::load_topology_string(kTopology, "t.yaml");
  REQUIRE(load.topology);
  Node a = start_node(*load.topology, "a", 100ms);
  router::RouterConfig config = router::RouterConfig::from_topology(*load.topology);
  config.daemons = {{"a", "127.0.0.1", a.server->port()}};
  router::RouterClient client(config);
  for (int i = 0; i < 3; ++i) {
    auto health = client.health();
    REQUIRE(health.ok());
    INFO("round " << i << ": " << (*health)[0].result.status().to_string());
    CHECK((*health)[0].result.ok());
    std::this_thread::sleep_for(300ms);  // past the server's idle timeout: it closes the connection
  }
}
