// The router client hashes tokens into exactly the chunk keys that engines store under and that
// kvfabricd's /lookup computes from tokens: protocol::ChunkHasher over the topology's model
// fingerprint and chunk size, full chunks only.
#include <memory>
#include <string>
#include <vector>

#include "catch.h"
#include "kvf/control/store_control_api.h"
#include "kvf/fabric/topology.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/router/router_client.h"
#include "kvf/store/chunk_store.h"

using namespace kvf;

namespace {

constexpr const char* kTopology = R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
  - name: other
    layout: {kind: flash_attention, layers: 4, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
nodes:
  - name: n
    address: 127.0.0.1
)";

fabric::Topology topology() {
  auto load = fabric::load_topology_string(kTopology, "t.yaml");
  REQUIRE(load.topology);
  return *load.topology;
}

std::vector<uint32_t> prompt(size_t n, uint32_t salt = 0) {
  std::vector<uint32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = static_cast<uint32_t>(i * 7 + 1 + salt);
  return t;
}

}  // namespace

TEST_CASE("router keys: equal to protocol's ChunkHasher over the model's fingerprint and chunk size") {
  const fabric::Topology topo = topology();
  router::RouterClient client(router::RouterConfig::from_topology(topo));
  const fabric::ModelSpec& m = *topo.find_model("m");
  const protocol::ChunkHasher hasher(protocol::model_fingerprint(m.name, m.layout), m.chunk_tokens);

  const auto tokens = prompt(32 * 5 + 7);  // five full chunks and a partial tail
  auto keys = client.chunk_keys("m", tokens);
  REQUIRE(keys.ok());
  CHECK(keys.value() == hasher.hash(tokens));
  CHECK(keys->size() == 5);  // the tail is not a chunk

  // The chain by hand: key_i = next(key_{i-1}, chunk i).
  protocol::ChunkKey previous;
  for (size_t i = 0; i < keys->size(); ++i) {
    previous = hasher.next(previous, std::span<const uint32_t>(tokens).subspan(i * 32, 32));
    CHECK(previous == (*keys)[i]);
  }

  // Another model (other geometry) never shares keys; a different first token changes every key.
  auto other = client.chunk_keys("other", tokens);
  REQUIRE(other.ok());
  for (size_t i = 0; i < keys->size(); ++i) CHECK((*other)[i] != (*keys)[i]);
  auto salted = client.chunk_keys("m", prompt(32 * 5, 1));
  REQUIRE(salted.ok());
  for (size_t i = 0; i < salted->size(); ++i) CHECK((*salted)[i] != (*keys)[i]);

  auto unknown = client.chunk_keys("nope", tokens);
  REQUIRE_FALSE(unknown.ok());
  CHECK(unknown.status().code() == ErrorCode::kInvalidArgument);
  CHECK(client.chunk_keys("m", prompt(31))->empty());
}

TEST_CASE("router keys: the daemon's lookup by tokens finds chunks stored under the router's keys") {
  const fabric::Topology topo = topology();
  router::RouterClient client(router::RouterConfig::from_topology(topo));
  auto arena = gpudirect::MemoryRegion::allocate_host(nullptr, 1 << 20);
  REQUIRE(arena.ok());
  auto made = store::ChunkStore::create(std::move(arena.value()));
  REQUIRE(made.ok());
  std::unique_ptr<store::ChunkStore> store = std::move(made.value());
  control::StoreControlApi api(topo, "n", *store);

  const auto tokens = prompt(32 * 6);
  auto keys = client.chunk_keys("m", std::span<const uint32_t>(tokens).first(32 * 4));  // the first 4 chunks
  REQUIRE(keys.ok());
  for (const auto& key : keys.value()) {
    auto r = store->reserve(key, 100, 1);
    REQUIRE(r.ok());
    REQUIRE(store->commit(key, r->id).ok());
  }
  auto found = api.lookup(control::LookupRequest{"m", tokens});
  REQUIRE(found.ok());
  CHECK(found->query_chunks == 6);
  REQUIRE(found->matches.size() == 1);
  CHECK(found->matches[0].matched_chunks == 4);
  CHECK(found->matches[0].matched_tokens == 128);
}
