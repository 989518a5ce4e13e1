// PlacementService, kvfabricd's adaptive placement, over a real ChunkStore (with an SSD tier) and
// the real StoreControlApi and codecs: the policy file's errors name file and field; a re-plan
// keeps hot entries raw in DRAM and compresses or demotes cold ones when DRAM is short, and every
// entry still decodes to its data within its codec's error; an SSD entry that turned hot comes
// back; pinned entries, lossy entries (never made raw again) and entries of unknown models are
// left as they are; the counters reach /metrics.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "catch.h"
#include "kvf/control/placement_service.h"
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

// Model m's chunk: 2 layers x K,V x 32 tokens x 128 channels of bf16 = 32 KiB.
constexpr const char* kTopology = R"(
cluster: c
models:
  - name: m
    layout: {kind: flash_attention, layers: 2, kv_heads: 2, head_dim: 64, dtype: bf16, block_tokens: 16, blocks: 64}
    chunk_tokens: 32
nodes:
  - name: n
    address: 127.0.0.1
)";
constexpr uint64_t kChunk = 32768;

std::string temp_path(const std::string& name) {
  return std::filesystem::temp_directory_path().string() + "/kvf-placement-test-" +
         std::to_string(::getpid()) + "-" + name;
}

std::string write_file(const std::string& name, const std::string& text) {
  const std::string path = temp_path(name);
  std::ofstream(path) << text;
  return path;
}

// Raw, int8 and int4 as kvfabric-codec-quality measures them (rounded); recomputing costs 20 ms a
// chunk here, so keeping something beats dropping it.
constexpr const char* kPolicy = R"({
  "profiles": [
    {"name": "identity", "codec": "identity", "size_ratio": 1.0, "quality": 1.0},
    {"name": "int8", "codec": "int8", "size_ratio": 0.52, "quality": 0.995},
    {"name": "int4", "codec": "int4", "size_ratio": 0.28, "quality": 0.97}
  ],
  "delay_weight": 1.0, "dram_gbps": 50, "ssd_gbps": 2,
  "recompute_us_per_token": 625, "reuse_half_life_s": 600, "base_reuse": 0.5, "dram_fill": 1.0
})";

struct Fixture {
  explicit Fixture(uint64_t arena_bytes, uint64_t ssd_bytes = 0) {
    auto load = fabric::load_topology_string(kTopology, "t.yaml");
    REQUIRE(load.topology);
    topology = *load.topology;
    auto arena = gpudirect::MemoryRegion::allocate_host(nullptr, arena_bytes);
    REQUIRE(arena.ok());
    store::ChunkStoreOptions options;
    if (ssd_bytes > 0) {
      options.ssd = store::SsdTierOptions{};
      options.ssd->path = temp_path("tier.ssd");
      options.ssd->capacity = ssd_bytes;
    }
    auto made = store::ChunkStore::create(std::move(arena.value()), std::move(options));
    REQUIRE(made.ok());
    store = std::move(made.value());
    api = std::make_unique<StoreControlApi>(topology, "n", *store);
    const fabric::ModelSpec& spec = *topology.find_model("m");
    model = protocol::model_fingerprint(spec.name, spec.layout);
  }

  // A chunk of random bf16 KV, stored raw under model m (or `as_model`).
  std::vector<uint8_t> put(const ChunkKey& key, std::optional<ChunkKey> as_model = std::nullopt) {
    std::vector<uint8_t> data = test::random_bf16_kv(kChunk, rng);
    auto r = store->reserve(key, kChunk, 1, as_model.value_or(model));
    REQUIRE(r.ok());
    std::memcpy(store->bytes(*r).data(), data.data(), kChunk);
    REQUIRE(store->commit(key, r->id).ok());
    return data;
  }

  // 24 chunks of 32 KiB (768 KiB), the first 4 loaded 30 times each (hot), the rest never; their
  // data in `original`.
  std::vector<ChunkKey> put_hot_and_cold(uint64_t first,
                                         std::unordered_map<ChunkKey, std::vector<float>>& original) {
    std::vector<ChunkKey> keys;
    for (uint64_t i = 0; i < 24; ++i) {
      keys.push_back(ChunkKey{first + i, i});
      original[keys.back()] = floats(put(keys.back()));
    }
    for (size_t i = 0; i < 4; ++i) load(keys[i], 30);
    return keys;
  }

  void load(const ChunkKey& key, int times) {
    for (int i = 0; i < times; ++i) {
      auto lease = store->acquire(key, 2);
      REQUIRE(lease.ok());
      REQUIRE(store->release(lease->id).ok());
    }
  }

  // What an engine would load: the entry's bytes, decoded when encoded.
  std::vector<float> loaded(const ChunkKey& key) {
    auto lease = store->acquire(key, 2);
    REQUIRE(lease.ok());
    std::span<const uint8_t> bytes = store->bytes(*lease);
    std::vector<uint8_t> raw(kChunk);
    if (lease->codec == protocol::KvCodec::kIdentity) {
      REQUIRE(bytes.size() == kChunk);
      std::memcpy(raw.data(), bytes.data(), kChunk);
    } else {
      REQUIRE(gpudirect::decode_chunk(bytes, raw).ok());
    }
    REQUIRE(store->release(lease->id).ok());
    return floats(raw);
  }

  static std::vector<float> floats(const std::vector<uint8_t>& raw) {
    std::vector<float> out(raw.size() / 2);
    for (size_t i = 0; i < out.size(); ++i) {
      uint16_t v = 0;
      std::memcpy(&v, &raw[2 * i], 2);
      out[i] = codec_math::bf16_to_float(v);
    }
    return out;
  }

  std::optional<store::EntryInfo> info(const ChunkKey& key) const { return store->peek(key); }

  fabric::Topology topology;
  std::unique_ptr<store::ChunkStore> store;
  std::unique_ptr<StoreControlApi> api;
  ChunkKey model;
  std::mt19937 rng{11};
};

double relative_error(const std::vector<float>& want, const std::vector<float>& got) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (want[i] - got[i]) * (want[i] - got[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

PlacementPolicy policy(const std::string& text = kPolicy) {
  auto p = read_placement_policy(write_file("policy.json", text));
  REQUIRE(p.ok());
  return p.value();
}

}  // namespace

TEST_CASE("placement policy file: fields are read, and every problem names the file and the field") {
  const PlacementPolicy p = policy();
  REQUIRE(p.planner.codecs.size() == 3);
  CHECK(p.planner.codecs[1].codec == protocol::KvCodec::kInt8);
  CHECK(p.planner.codecs[2].size_ratio == Approx(0.28));
  CHECK(p.planner.ssd_bytes_per_second == Approx(2e9));
  CHECK(p.recompute_seconds_per_token == Approx(625e-6));
  CHECK(p.dram_fill == Approx(1.0));
  // Defaults for what is left out.
  const PlacementPolicy d =
      policy(R"({"profiles": [{"name": "identity", "codec": "identity", "size_ratio": 1, "quality": 1}]})");
  CHECK(d.planner.delay_weight == Approx(1.0));
  CHECK(d.base_reuse == Approx(0.5));
  CHECK(d.dram_fill == Approx(0.9));

  auto refused = [](const std::string& text, const std::string& part) {
    const std::string path = write_file("bad.json", text);
    auto bad = read_placement_policy(path);
    REQUIRE_FALSE(bad.ok());
    CHECK(bad.status().code() == ErrorCode::kInvalidArgument);
    CHECK_THAT(bad.status().message(), Catch::Contains(path) && Catch::Contains(part));
  };
  const std::string raw = R"({"name": "identity", "codec": "identity", "size_ratio": 1, "quality": 1})";
  refused("{", "not JSON");
  refused(R"({"profiles": []})", "profiles: the list is empty");
  refused(R"({"profiles": [{"name": "int8", "codec": "int8", "size_ratio": 0.5, "quality": 0.99}]})",
          "no identity profile");
  refused(R"({"profiles": [)" + raw + R"(], "delay": 2})", "unknown field \"delay\"");
  refused(
      R"({"profiles": [)" + raw + R"(, {"name": "int9", "codec": "int9", "size_ratio": 0.5, "quality": 1}]})",
      "profiles[1].codec");
  refused(R"({"profiles": [)" + raw +
              R"(, {"name": "int4:r=32", "codec": "int8", "size_ratio": 0.5, "quality": 1}]})",
          "profiles[1].name");
  refused(
      R"({"profiles": [)" + raw + R"(, {"name": "int8", "codec": "int8", "size_ratio": 3, "quality": 1}]})",
      "profiles[1].size_ratio");
  refused(R"({"profiles": [)" + raw + R"(, {"name": "int8", "codec": "int8", "quality": 1}]})",
          "\"size_ratio\" and \"quality\" are required");
  refused(R"({"profiles": [)" + raw + R"(], "dram_fill": 0})", "dram_fill");
  refused(R"({"profiles": [)" + raw + R"(], "ssd_gbps": "fast"})", "ssd_gbps: expected a number");

  auto missing = read_placement_policy(temp_path("no-such-policy.json"));
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.status().code() == ErrorCode::kNotFound);
}

TEST_CASE("placement: with DRAM short, cold entries are compressed or moved to the SSD, hot ones stay raw") {
  // 24 chunks of 32 KiB (768 KiB) over a 512 KiB arena's worth of plan: not all can stay raw.
  Fixture f(1 << 20, 4 << 20);
  PlacementPolicy p = policy();
  p.dram_fill = 0.5;
  std::unordered_map<ChunkKey, std::vector<float>> original;
  const std::vector<ChunkKey> keys = f.put_hot_and_cold(100, original);  // hot

  PlacementService service(f.topology, *f.store, *f.api, p, std::chrono::milliseconds(0));
  const PlacementRound round = service.run_once(std::chrono::seconds(1));
  INFO(round.to_string());
  CHECK(round.entries == 24);
  CHECK(round.planned == 24);
  CHECK(round.unplanned == 0);
  CHECK(round.failed == 0);
  CHECK(round.dropped == 0);  // recomputing costs more than the SSD here
  CHECK(round.recoded + round.demoted > 0);

  // A second round with nothing new to learn changes nothing.
  const PlacementRound again = service.run_once(std::chrono::seconds(1));
  INFO(again.to_string());
  CHECK(again.recoded + again.demoted + again.promoted + again.dropped + again.failed == 0);

  uint64_t dram_bytes = 0;
  for (const ChunkKey& key : keys) {
    auto e = f.info(key);
    REQUIRE(e);
    if (e->tier == protocol::Tier::kDram) dram_bytes += e->bytes;
  }
  // The plan counts an encoding as raw x its profile's size ratio; the real one may differ a little.
  CHECK(dram_bytes <= (512u << 10) * 21 / 20);
  for (int i = 0; i < 4; ++i) {
    auto e = f.info(keys[static_cast<size_t>(i)]);
    CHECK(e->codec == protocol::KvCodec::kIdentity);
    CHECK(e->tier == protocol::Tier::kDram);
  }
  // Every entry still loads as its data: exactly when raw, within its codec's error otherwise.
  for (const ChunkKey& key : keys) {
    const protocol::KvCodec codec = f.info(key)->codec;
    const double err = relative_error(original[key], f.loaded(key));
    if (codec == protocol::KvCodec::kIdentity) {
      CHECK(err == 0);
    } else {
      CHECK(err < 0.2);
    }
  }
  REQUIRE(f.store->audit().ok());
  const std::string metrics = service.metrics();
  CHECK_THAT(metrics, Catch::Contains("kvfabric_placement_rounds_total 2"));
  CHECK_THAT(metrics, Catch::Contains("kvfabric_placement_changes_total{kind=\"recoded\"} " +
                                      std::to_string(round.recoded)));
}

TEST_CASE("placement: without an SSD tier, cold entries are re-encoded to fit DRAM") {
  Fixture f(1 << 20);
  PlacementPolicy p = policy();
  p.dram_fill = 0.5;
  std::unordered_map<ChunkKey, std::vector<float>> original;
  const std::vector<ChunkKey> keys = f.put_hot_and_cold(200, original);
  PlacementService service(f.topology, *f.store, *f.api, p, std::chrono::milliseconds(0));
  const PlacementRound round = service.run_once(std::chrono::seconds(1));
  INFO(round.to_string());
  CHECK(round.recoded > 0);
  CHECK(round.failed == 0);
  CHECK(round.demoted == 0);
  uint64_t bytes = 0;
  std::map<protocol::KvCodec, int> codecs;
  for (const ChunkKey& key : keys) {
    auto e = f.info(key);
    if (!e) continue;  // dropped
    bytes += e->bytes;
    ++codecs[e->codec];
    const double err = relative_error(original[key], f.loaded(key));
    if (e->codec == protocol::KvCodec::kIdentity) {
      CHECK(err == 0);
    } else {
      CHECK(err > 0);
      CHECK(err < 0.2);
    }
  }
  CHECK(bytes <= (512u << 10) * 21 / 20);
  CHECK(codecs[protocol::KvCodec::kIdentity] >= 4);  // the hot ones at least
  for (int i = 0; i < 4; ++i)
    CHECK(f.info(keys[static_cast<size_t>(i)])->codec == protocol::KvCodec::kIdentity);
  REQUIRE(f.store->audit().ok());
}

TEST_CASE("placement: an entry on the SSD that turns hot comes back to DRAM") {
  Fixture f(1 << 20, 4 << 20);
  const ChunkKey hot{1, 1}, cold{2, 2};
  const auto data = Fixture::floats(f.put(hot));
  f.put(cold);
  REQUIRE(f.store->demote(hot).ok());
  REQUIRE(f.info(hot)->tier == protocol::Tier::kSsd);

  PlacementService service(f.topology, *f.store, *f.api, policy(), std::chrono::milliseconds(0));
  // Loads promote it by themselves; demote it again so that only the service can bring it back.
  f.load(hot, 40);
  REQUIRE(f.store->demote(hot).ok());
  const PlacementRound round = service.run_once(std::chrono::seconds(1));
  INFO(round.to_string());
  CHECK(round.promoted == 1);
  CHECK(round.failed == 0);
  CHECK(f.info(hot)->tier == protocol::Tier::kDram);
  CHECK(f.info(hot)->codec == protocol::KvCodec::kIdentity);
  CHECK(relative_error(data, f.loaded(hot)) == 0);
}

TEST_CASE("placement: pinned, lossy and unknown-model entries are left as they are") {
  Fixture f(1 << 20);
  const ChunkKey pinned{1, 1}, lossy{2, 2}, orphan{3, 3};
  f.put(pinned);
  f.put(lossy);
  f.put(orphan, ChunkKey{9, 9});  // a model the topology does not know: its shape is unknown
  REQUIRE(f.store->pin(pinned).ok());
  protocol::KvCodecParams int4;
  int4.codec = protocol::KvCodec::kInt4;
  REQUIRE(f.api->compress_keys({lossy}, int4).compressed == 1);

  // A generous DRAM budget: everything could be raw, but int4's loss cannot be undone, and pinned
  // entries stay as pinned; a starved one: the pinned entry still stays.
  for (double fill : {1.0, 0.05}) {
    PlacementPolicy p = policy();
    p.dram_fill = fill;
    p.recompute_seconds_per_token = 0.01;  // keeping beats recomputing, even at int4's quality
    PlacementService service(f.topology, *f.store, *f.api, p, std::chrono::milliseconds(0));
    const PlacementRound round = service.run_once(std::chrono::seconds(1));
    INFO(round.to_string());
    CHECK(round.unplanned == 1);
    CHECK(round.planned == 1);  // only the lossy entry
    CHECK(f.info(pinned)->codec == protocol::KvCodec::kIdentity);
    CHECK(f.info(pinned)->tier == protocol::Tier::kDram);
    CHECK(f.info(orphan)->codec == protocol::KvCodec::kIdentity);
    REQUIRE(f.info(lossy));
    CHECK(f.info(lossy)->codec != protocol::KvCodec::kIdentity);
  }
}

TEST_CASE("placement: the service's own thread re-plans and stops with the service") {
  Fixture f(1 << 20);
  f.put(ChunkKey{1, 1});
  PlacementService service(f.topology, *f.store, *f.api, policy(), std::chrono::milliseconds(100));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (service.metrics().find("kvfabric_placement_rounds_total 0") != std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  CHECK_THAT(service.metrics(), !Catch::Contains("kvfabric_placement_rounds_total 0\n"));
}
