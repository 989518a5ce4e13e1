// StoreControlApi, the daemon's ControlApi over a real ChunkStore: a router's lookup by tokens
// hashes them the way engines key their chunks (the topology's model fingerprint and chunk size),
// pin/unpin/clear (all, keys, model) act on the store, compress re-encodes entries with real codecs
// (and back), stats and metrics read it, and what is not built says so. With an SSD tier under the
// store, lookups say "ssd" for prefixes that reach into it and stats report both tiers.
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "catch.h"
#include "kvf/control/store_control_api.h"
#include "kvf/fabric/topology.h"
#include "kvf/gpudirect/kv_codec.h"
#include "kvf/gpudirect/kv_codec_math.h"
#include "kvf/gpudirect/memory_region.h"
#include "kvf/store/chunk_store.h"
#include "random_kv.h"

using namespace kvf;
using namespace kvf::control;

namespace {

// m2 differs from m only in its name, m3 only in its geometry: each is a model of its own.
constexpr const char* kTopology = R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
  - name: m2
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
  - name: m3
    layout: {kind: flash_attention, layers: 4, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
nodes:
  - name: n
    address: 127.0.0.1
)";

struct Fixture {
  // With `ssd_bytes`, the store has an SSD tier of that size in the temp directory.
  explicit Fixture(uint64_t arena_bytes = 1 << 20, uint64_t ssd_bytes = 0) {
    auto load = fabric::load_topology_string(kTopology, "t.yaml");
    REQUIRE(load.topology);
    topology = *load.topology;
    auto arena = gpudirect::MemoryRegion::allocate_host(nullptr, arena_bytes);
    REQUIRE(arena.ok());
    store::ChunkStoreOptions options;
    if (ssd_bytes > 0) {
      options.ssd = store::SsdTierOptions{};
      options.ssd->path = std::filesystem::temp_directory_path().string() + "/kvf-control-api-test-" +
                          std::to_string(::getpid()) + ".ssd";
      options.ssd->capacity = ssd_bytes;
    }
    auto made = store::ChunkStore::create(std::move(arena.value()), std::move(options));
    REQUIRE(made.ok());
    store = std::move(made.value());
    api = std::make_unique<StoreControlApi>(topology, "n", *store,
                                            [] { return std::string("extra_metric 1\n"); });
  }

  // Stores the chunks of `tokens` as an engine serving `model` would: keyed and recorded with the
  // model's fingerprint.
  std::vector<ChunkKey> put_prompt(const std::vector<uint32_t>& tokens, const std::string& model = "m",
                                   uint64_t bytes = 1000) {
    const fabric::ModelSpec& m = *topology.find_model(model);
    const protocol::ChunkHasher hasher(protocol::model_fingerprint(m.name, m.layout), m.chunk_tokens);
    std::vector<ChunkKey> keys = hasher.hash(tokens);
    for (const auto& key : keys) {
      auto r = store->reserve(key, bytes, 1, hasher.model());
      REQUIRE(r.ok());
      REQUIRE(store->commit(key, r->id).ok());
    }
    return keys;
  }

  fabric::Topology topology;
  std::unique_ptr<store::ChunkStore> store;
  std::unique_ptr<StoreControlApi> api;
};

std::vector<uint32_t> prompt(size_t n) {
  std::vector<uint32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = static_cast<uint32_t>(i * 7 + 1);
  return t;
}

}  // namespace

TEST_CASE("store control api: lookup by tokens finds what engines stored under the model's keys") {
  Fixture f;
  const auto keys = f.put_prompt(prompt(96));  // 3 chunks of 32 tokens
  REQUIRE(keys.size() == 3);

  LookupRequest by_tokens{"m", prompt(130)};  // 4 full chunks; the first 3 are held
  auto r = f.api->lookup(by_tokens);
  REQUIRE(r.ok());
  CHECK(r->query_chunks == 4);
  REQUIRE(r->matches.size() == 1);
  CHECK(r->matches[0].node == "n");
  CHECK(r->matches[0].engine.empty());
  CHECK(r->matches[0].matched_chunks == 3);
  CHECK(r->matches[0].matched_tokens == 96);
  CHECK(r->matches[0].tier == Tier::kDram);

  LookupRequest by_keys{"m", std::vector<ChunkKey>{keys[0], ChunkKey{1, 2}}};
  r = f.api->lookup(by_keys);
  REQUIRE(r.ok());
  CHECK(r->matches.at(0).matched_chunks == 1);

  LookupRequest other{"m", std::vector<uint32_t>{9, 9, 9}};  // no full chunk: nothing to match
  r = f.api->lookup(other);
  REQUIRE(r.ok());
  CHECK(r->query_chunks == 0);
  CHECK(r->matches.empty());

  auto unknown = f.api->lookup(LookupRequest{"llama", prompt(32)});
  REQUIRE_FALSE(unknown.ok());
  CHECK(unknown.status().code() == ErrorCode::kInvalidArgument);
  CHECK(unknown.status().message() == "unknown model 'llama' (the topology has: m, m2, m3)");
  CHECK(f.api->stats()->lookups == 4);
}

TEST_CASE("store control api: pin, unpin and clear act on the store") {
  Fixture f;
  const auto keys = f.put_prompt(prompt(64));
  const ChunkKey absent{7, 7};

  auto pinned = f.api->pin(PinRequest{{keys[0], absent}});
  REQUIRE(pinned.ok());
  CHECK(pinned->changed == 1);
  CHECK(pinned->not_found == std::vector<ChunkKey>{absent});
  CHECK(f.store->stats().pinned == 1);

  auto unpinned = f.api->unpin(PinRequest{{keys[0], keys[1]}});  // keys[1] is held but not pinned
  REQUIRE(unpinned.ok());
  CHECK(unpinned->changed == 1);
  CHECK(unpinned->not_found.empty());
  CHECK(f.store->stats().pinned == 0);

  auto cleared = f.api->clear(ClearRequest{ClearRequest::Scope::kKeys, "", {keys[1]}});
  REQUIRE(cleared.ok());
  CHECK(cleared->cleared == 1);
  CHECK(cleared->freed_bytes == 1024);  // 1000 bytes rounded up to the store's 256-byte alignment
  auto all = f.api->clear(ClearRequest{});
  REQUIRE(all.ok());
  CHECK(all->cleared == 1);
  CHECK(f.store->stats().entries == 0);
}

TEST_CASE("store control api: health, stats and metrics read the store; move needs peers") {
  Fixture f;
  f.put_prompt(prompt(64));
  const HealthReport health = f.api->health();
  CHECK(health.healthy);
  CHECK(health.node == "n");
  auto stats = f.api->stats();
  REQUIRE(stats.ok());
  CHECK(stats->entries == 2);
  REQUIRE(stats->tiers.size() == 1);
  CHECK(stats->tiers[0].capacity_bytes == 1 << 20);
  CHECK(stats->tiers[0].used_bytes == 2048);
  auto metrics = f.api->metrics();
  REQUIRE(metrics.ok());
  CHECK(metrics->find("\nkvf_store_entries 2\n") != std::string::npos);
  CHECK(metrics->find("# TYPE kvf_store_inserts_total counter\nkvf_store_inserts_total 2\n") !=
        std::string::npos);
  CHECK(metrics->find("extra_metric 1\n") != std::string::npos);
  CHECK(metrics->back() == '\n');

  auto move = f.api->move(MoveRequest{"n", "m2", {}, false});
  REQUIRE_FALSE(move.ok());
  CHECK(move.status().code() == ErrorCode::kUnavailable);
  CHECK(move.status().message().find("without peers") != std::string::npos);
}

TEST_CASE("store control api: clear by model removes that model's entries and no other's") {
  Fixture f;
  // The same tokens under three models: three distinct key chains in one store.
  const auto of_m = f.put_prompt(prompt(96), "m", 1000);
  const auto of_m2 = f.put_prompt(prompt(96), "m2", 2000);
  const auto of_m3 = f.put_prompt(prompt(128), "m3", 3000);
  REQUIRE(of_m.size() == 3);
  REQUIRE(of_m3.size() == 4);
  for (size_t i = 0; i < of_m.size(); ++i) {
    REQUIRE_FALSE(of_m[i] == of_m2[i]);
    REQUIRE_FALSE(of_m[i] == of_m3[i]);
  }
  // An entry stored without a model (an old engine) is no model's.
  auto r = f.store->reserve(ChunkKey{5, 5}, 100, 1);
  REQUIRE(r.ok());
  REQUIRE(f.store->commit(ChunkKey{5, 5}, r->id).ok());
  REQUIRE(f.api->pin(PinRequest{{of_m[0], of_m2[0]}})->changed == 2);  // a pin does not save it from clear
  auto lease = f.store->acquire(of_m[1], 9);  // nor does a lease: the bytes stay until released
  REQUIRE(lease.ok());

  auto cleared = f.api->clear(ClearRequest{ClearRequest::Scope::kModel, "m", {}});
  REQUIRE(cleared.ok());
  CHECK(cleared->cleared == 3);
  CHECK(cleared->freed_bytes == 3 * 1024);
  for (const auto& k : of_m) CHECK_FALSE(f.store->peek(k).has_value());
  for (const auto& k : of_m2) CHECK(f.store->peek(k).has_value());
  for (const auto& k : of_m3) CHECK(f.store->peek(k).has_value());
  CHECK(f.store->peek(ChunkKey{5, 5}).has_value());
  CHECK(f.store->stats().pinned == 1);
  CHECK(f.store->verify(lease.value()).ok());
  REQUIRE(f.store->release(lease->id).ok());
  // Lookups by tokens agree: m holds nothing now, m2 all of it.
  CHECK(f.api->lookup(LookupRequest{"m", prompt(96)})->matches.empty());
  CHECK(f.api->lookup(LookupRequest{"m2", prompt(96)})->matches.at(0).matched_chunks == 3);

  // Again: nothing left of m.
  cleared = f.api->clear(ClearRequest{ClearRequest::Scope::kModel, "m", {}});
  REQUIRE(cleared.ok());
  CHECK(cleared->cleared == 0);
  CHECK(cleared->freed_bytes == 0);

  cleared = f.api->clear(ClearRequest{ClearRequest::Scope::kModel, "m3", {}});
  REQUIRE(cleared.ok());
  CHECK(cleared->cleared == 4);
  CHECK(cleared->freed_bytes == 4 * 3072);
  for (const auto& k : of_m2) CHECK(f.store->peek(k).has_value());
  CHECK(f.store->stats().entries == 4);  // m2's three and the unattributed one
  REQUIRE(f.store->audit().ok());

  auto unknown = f.api->clear(ClearRequest{ClearRequest::Scope::kModel, "llama", {}});
  REQUIRE_FALSE(unknown.ok());
  CHECK(unknown.status().code() == ErrorCode::kInvalidArgument);
  CHECK(unknown.status().message() == "unknown model 'llama' (the topology has: m, m2, m3)");
  CHECK(f.store->stats().entries == 4);  // an unknown name clears nothing
}

TEST_CASE(
    "store control api: compress re-encodes entries with a codec and back; what cannot be is reported") {
  Fixture f;
  // Model m's chunk: 2 layers x K,V x 32 tokens x 128 channels of bf16 = 32 KiB.
  const fabric::ModelSpec& m = *f.topology.find_model("m");
  const ChunkKey fingerprint = protocol::model_fingerprint(m.name, m.layout);
  const protocol::KvChunkGeometry geometry{2, 2, 2, 16, 128, 2};
  REQUIRE(geometry.raw_bytes() == 32768);
  std::mt19937 rng(7);
  auto put = [&](const ChunkKey& key, uint64_t bytes, const ChunkKey& model) {
    std::vector<uint8_t> data = test::random_bf16_kv(bytes, rng);
    auto r = f.store->reserve(key, bytes, 1, model);
    REQUIRE(r.ok());
    std::memcpy(f.store->bytes(*r).data(), data.data(), bytes);
    REQUIRE(f.store->commit(key, r->id).ok());
    return data;
  };
  auto stored = [&](const ChunkKey& key) {
    auto lease = f.store->acquire(key, 2);
    REQUIRE(lease.ok());
    std::vector<uint8_t> bytes(f.store->bytes(*lease).begin(), f.store->bytes(*lease).end());
    const protocol::KvCodec codec = lease->codec;
    REQUIRE(f.store->release(lease->id).ok());
    return std::make_pair(codec, bytes);
  };
  const ChunkKey k0{1, 1}, k1{2, 2}, k2{3, 3}, odd{4, 4}, orphan{5, 5}, absent{7, 7};
  const auto raw0 = put(k0, 32768, fingerprint);
  put(k1, 32768, fingerprint);
  put(k2, 32768, fingerprint);
  put(odd, 1000, fingerprint);     // not the model's chunk size
  put(orphan, 32768, ChunkKey{});  // no model recorded: its shape is unknown

  // What int8 makes of chunk 0, by the CPU codec directly.
  protocol::KvCodecParams int8;
  int8.codec = protocol::KvCodec::kInt8;
  std::vector<uint8_t> expected(protocol::fixed_encoded_bytes(int8, geometry));
  REQUIRE(gpudirect::encode_chunk(int8, geometry, raw0, expected).ok());

  auto some = f.api->compress(CompressRequest{false, {k0, k1, absent}, "int8"});
  REQUIRE(some.ok());
  CHECK(some->compressed == 2);
  CHECK(some->failed == 0);
  CHECK(some->not_found == std::vector<ChunkKey>{absent});
  CHECK(some->bytes_before == 2 * 32768);
  CHECK(some->bytes_after == 2 * expected.size());
  CHECK(some->bytes_after < some->bytes_before * 52 / 100);
  const auto [codec0, bytes0] = stored(k0);
  CHECK(codec0 == protocol::KvCodec::kInt8);
  CHECK(bytes0 == expected);
  CHECK(f.store->peek(k0)->codec == protocol::KvCodec::kInt8);
  CHECK(f.store->audit().ok());

  // All: k0 and k1 are int8 already, k2 is re-encoded, the other two cannot be and say why.
  auto all = f.api->compress(CompressRequest{true, {}, "int8"});
  REQUIRE(all.ok());
  CHECK(all->compressed == 1);
  CHECK(all->unchanged == 2);
  CHECK(all->failed == 2);
  REQUIRE(all->errors.size() == 2);
  const std::string reasons = all->errors[0] + " | " + all->errors[1];
  CHECK(reasons.find("not the 32768") != std::string::npos);
  CHECK(reasons.find("not a model of the topology") != std::string::npos);
  CHECK(f.store->peek(odd)->codec == protocol::KvCodec::kIdentity);

  // Back to identity: the raw bytes are what int8 decodes to (its loss stays).
  auto back = f.api->compress(CompressRequest{false, {k0}, "identity"});
  REQUIRE(back.ok());
  CHECK(back->compressed == 1);
  const auto [codec_back, bytes_back] = stored(k0);
  CHECK(codec_back == protocol::KvCodec::kIdentity);
  std::vector<uint8_t> decoded(32768, 0xA5);
  REQUIRE(gpudirect::decode_chunk(expected, decoded).ok());
  CHECK(bytes_back == decoded);

  // A lossless codec round-trips the raw bytes exactly.
  auto zstd = f.api->compress(CompressRequest{false, {k0}, "zstd"});
  REQUIRE(zstd.ok());
  CHECK(zstd->compressed == 1);
  CHECK(zstd->bytes_after < 32768);
  REQUIRE(f.api->compress(CompressRequest{false, {k0}, "identity"}).ok());
  CHECK(stored(k0).second == decoded);

  for (const char* name : {"gzip", "", "Int8"}) {
    auto refused = f.api->compress(CompressRequest{true, {}, name});
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.status().code() == ErrorCode::kInvalidArgument);
    CHECK(refused.status().message().find("unknown codec") != std::string::npos);
  }
  CHECK(f.store->audit().ok());
}

TEST_CASE("store control api: with an SSD tier, lookup reports ssd for prefixes that reach into it") {
  Fixture f(4096, 1 << 20);  // the arena holds 4 chunks of 1000 bytes; the rest spill
  const std::vector<uint32_t> tokens = prompt(8 * 32);
  const std::vector<ChunkKey> keys = f.put_prompt(tokens);
  REQUIRE(keys.size() == 8);
  LookupRequest whole{"m", tokens, false};
  auto r = f.api->lookup(whole);
  REQUIRE(r.ok());
  REQUIRE(r->matches.size() == 1);
  CHECK(r->matches[0].matched_chunks == 8);
  CHECK(r->matches[0].tier == Tier::kSsd);
  LookupRequest tail{"m", std::vector<ChunkKey>(keys.begin() + 4, keys.end()), false};
  r = f.api->lookup(tail);
  REQUIRE(r.ok());
  REQUIRE(r->matches.size() == 1);
  CHECK(r->matches[0].matched_chunks == 4);
  CHECK(r->matches[0].tier == Tier::kDram);

  auto stats = f.api->stats();
  REQUIRE(stats.ok());
  CHECK(stats->entries == 8);
  REQUIRE(stats->tiers.size() == 2);
  CHECK(stats->tiers[0].tier == Tier::kDram);
  CHECK(stats->tiers[0].entries == 4);
  CHECK(stats->tiers[0].evictions == 4);
  CHECK(stats->tiers[0].spills == 4);
  CHECK(stats->tiers[1].tier == Tier::kSsd);
  CHECK(stats->tiers[1].capacity_bytes == 1 << 20);
  CHECK(stats->tiers[1].entries == 4);
  CHECK(stats->tiers[1].used_bytes == 4 * 4096);
  CHECK(stats->tiers[1].hits == 4);  // the whole-prompt lookup's first 4 chunks
  CHECK(stats->tiers[0].misses == 4);
  auto metrics = f.api->metrics();
  REQUIRE(metrics.ok());
  CHECK(metrics->find("\nkvf_store_ssd_entries 4\n") != std::string::npos);
  CHECK(metrics->find("\nkvf_store_ssd_spills_total 4\n") != std::string::npos);

  // Compress covers both tiers (identity: every entry is already raw, none is promoted for it); a
  // pin brings an SSD entry back to DRAM.
  auto compressed = f.api->compress(CompressRequest{true, {}, "identity"});
  REQUIRE(compressed.ok());
  CHECK(compressed->unchanged == 8);
  CHECK(f.store->peek(keys[0])->tier == Tier::kSsd);
  auto pinned = f.api->pin(PinRequest{{keys[0]}});
  REQUIRE(pinned.ok());
  CHECK(pinned->changed == 1);
  CHECK(f.store->peek(keys[0])->tier == Tier::kDram);
  CHECK(f.store->audit().ok());
}
