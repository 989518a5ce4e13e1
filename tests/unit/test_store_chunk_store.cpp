// ChunkStore on one thread: put/commit/get with checksums, abort, expiry with an injected clock,
// LRU order, pins under pressure, out-of-memory, clear, drop_client, error paths, and stats that
// add up after every operation of a random sequence. Then the SSD tier under the arena (spill on
// eviction, promotion on acquire with bytes checked on random data and poisoned blocks, a corrupted
// file, a full tier, pins, clears, codecs, concurrent promotions; with O_DIRECT and with the
// buffered fallback), re-encoding entries (reserve_replacement / commit_replacement), reuse counts,
// entries() and demote, and spills written without the store's mutex (a write held or failed on
// purpose through SsdTierOptions::before_write, and a concurrent mix with an auditor thread).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "catch.h"
#include "kvf/store/chunk_store.h"

using namespace kvf;
using namespace kvf::store;
using protocol::ChunkKey;
using protocol::KvCodec;
using protocol::Tier;
using namespace std::chrono_literals;

namespace {

struct ManualClock {
  StoreClock::time_point now = StoreClock::time_point{} + 1000h;
};

ChunkKey key(uint64_t i) {
  return ChunkKey{0x5eed0000 + i, i * 0x9E3779B97F4A7C15ull + 1};
}

// Content derived from the key, so any reader can check what it got.
std::vector<uint8_t> content(const ChunkKey& k, uint64_t bytes) {
  std::vector<uint8_t> out(bytes);
  uint64_t x = k.lo ^ (k.hi << 1) ^ bytes;
  for (auto& b : out) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b = static_cast<uint8_t>(x);
  }
  return out;
}

std::unique_ptr<ChunkStore> make_store(uint64_t capacity, ManualClock* clock = nullptr,
                                       StoreClock::duration reservation_timeout = 10s,
                                       StoreClock::duration lease_timeout = 10s,
                                       std::optional<SsdTierOptions> ssd = std::nullopt) {
  auto arena = gpudirect::MemoryRegion::allocate_host(nullptr, capacity);
  REQUIRE(arena.ok());
  ChunkStoreOptions options;
  options.alignment = 256;
  options.reservation_timeout = reservation_timeout;
  options.lease_timeout = lease_timeout;
  options.ssd = std::move(ssd);
  if (clock) options.clock = [clock] { return clock->now; };
  auto store = ChunkStore::create(std::move(arena.value()), std::move(options));
  INFO(store.status().to_string());
  REQUIRE(store.ok());
  return std::move(store.value());
}

// How an SSD-tier test opens its file: in the temp directory (ext4 here: O_DIRECT), and again
// through an opener that refuses O_DIRECT with EINVAL (as tmpfs before Linux 6.6 did), which runs
// the buffered fallback.
struct SsdMode {
  bool refuse_direct = false;
  std::string name() const { return refuse_direct ? "buffered fallback" : "O_DIRECT where the fs allows"; }
};

std::vector<SsdMode> ssd_modes() {
  return {SsdMode{false}, SsdMode{true}};
}

SsdTierOptions ssd_file(const SsdMode& mode, uint64_t capacity) {
  static int n = 0;
  SsdTierOptions o;
  o.path = std::filesystem::temp_directory_path().string() + "/kvf-chunk-store-test-" +
           std::to_string(::getpid()) + "-" + std::to_string(n++) + ".ssd";
  o.capacity = capacity;
  if (mode.refuse_direct) {
    o.open_file = [](const char* path, int flags, mode_t m) {
      if ((flags & O_DIRECT) != 0) {
        errno = EINVAL;
        return -1;
      }
      return ::open(path, flags, m);
    };
  }
  return o;
}

std::unique_ptr<ChunkStore> make_ssd_store(uint64_t capacity, const SsdMode& mode, uint64_t ssd_capacity) {
  auto store = make_store(capacity, nullptr, 10s, 10s, ssd_file(mode, ssd_capacity));
  REQUIRE(store->ssd_tier() != nullptr);
  if (mode.refuse_direct) REQUIRE_FALSE(store->ssd_tier()->direct());
  return store;
}

Tier tier_of(ChunkStore& store, const ChunkKey& k) {
  auto info = store.peek(k);
  REQUIRE(info.has_value());
  return info->tier;
}

Status put(ChunkStore& store, const ChunkKey& k, uint64_t bytes, ClientId writer = 1,
           const ChunkKey& model = {}) {
  auto r = store.reserve(k, bytes, writer, model);
  if (!r.ok()) return r.status();
  auto data = content(k, bytes);
  std::copy(data.begin(), data.end(), store.bytes(r.value()).begin());
  return store.commit(k, r->id);
}

bool stored(ChunkStore& store, const ChunkKey& k) {
  ChunkKey one[] = {k};
  return store.lookup(one) == 1;
}

void require_consistent(ChunkStore& store) {
  Status audit = store.audit();
  INFO(audit.to_string());
  REQUIRE(audit.ok());
}

}  // namespace

TEST_CASE("put, commit and get under a lease return the bytes and their checksum") {
  auto store = make_store(1 << 20);
  auto k = key(1);
  auto r = store->reserve(k, 10000, 7);
  REQUIRE(r.ok());
  REQUIRE(r->length == 10000);
  REQUIRE(r->offset % 256 == 0);
  auto data = content(k, 10000);
  std::copy(data.begin(), data.end(), store->bytes(r.value()).begin());
  // Not visible until committed.
  REQUIRE_FALSE(stored(*store, k));
  REQUIRE(store->acquire(k, 9).status().code() == ErrorCode::kNotFound);
  REQUIRE(store->commit(k, r->id).ok());
  REQUIRE(stored(*store, k));

  auto lease = store->acquire(k, 9);
  REQUIRE(lease.ok());
  REQUIRE(lease->length == 10000);
  REQUIRE(lease->offset == r->offset);
  REQUIRE(lease->checksum == chunk_checksum(data.data(), data.size()));
  auto got = store->bytes(lease.value());
  REQUIRE(std::equal(got.begin(), got.end(), data.begin(), data.end()));
  REQUIRE(store->verify(lease.value()).ok());
  // A flipped byte is caught by verify.
  store->arena().data()[lease->offset + 5000] ^= 0x40;
  REQUIRE(store->verify(lease.value()).code() == ErrorCode::kVerifyFailed);
  store->arena().data()[lease->offset + 5000] ^= 0x40;
  REQUIRE(store->release(lease->id).ok());
  REQUIRE(store->release(lease->id).code() == ErrorCode::kNotFound);

  auto s = store->stats();
  REQUIRE(s.entries == 1);
  REQUIRE(s.inserts == 1);
  REQUIRE(s.bytes_entries == 10240);  // rounded up to the alignment
  REQUIRE(s.active_leases == 0);
  require_consistent(*store);
}

TEST_CASE("a commit with an expected checksum stores only bytes that match it") {
  auto store = make_store(8192);
  auto data = content(key(1), 4096);
  const uint64_t right = chunk_checksum(data.data(), data.size());
  auto r = store->reserve(key(1), 4096, 1);
  REQUIRE(r.ok());
  std::copy(data.begin(), data.end(), store->bytes(r.value()).begin());
  store->bytes(r.value())[100] ^= 1;  // one bit damaged in flight
  Status wrong = store->commit(key(1), r->id, right);
  REQUIRE(wrong.code() == ErrorCode::kVerifyFailed);
  REQUIRE_FALSE(stored(*store, key(1)));
  REQUIRE(store->stats().entries == 0);
  // Still the writer's reservation: it can be repaired and committed, or aborted.
  store->bytes(r.value())[100] ^= 1;
  REQUIRE(store->commit(key(1), r->id, right).ok());
  REQUIRE(stored(*store, key(1)));

  auto r2 = store->reserve(key(2), 4096, 1);
  REQUIRE(r2.ok());
  REQUIRE(store->commit(key(2), r2->id, right + 1).code() == ErrorCode::kVerifyFailed);
  REQUIRE(store->abort(key(2), r2->id).ok());
  REQUIRE(store->stats().bytes_free == 4096);
  require_consistent(*store);
}

TEST_CASE("lookup returns the stored prefix of a key chain and stops at the first miss") {
  auto store = make_store(1 << 20);
  for (uint64_t i = 0; i < 5; ++i) REQUIRE(put(*store, key(i), 1000).ok());
  std::vector<ChunkKey> chain;
  for (uint64_t i = 0; i < 10; ++i) chain.push_back(key(i));
  REQUIRE(store->lookup(chain) == 5);
  std::vector<ChunkKey> holed = {key(0), key(1), key(99), key(3)};
  REQUIRE(store->lookup(holed) == 2);
  std::vector<ChunkKey> none = {key(50)};
  REQUIRE(store->lookup(none) == 0);
  REQUIRE(store->lookup(std::span<const ChunkKey>{}) == 0);
  auto s = store->stats();
  REQUIRE(s.hits == 7);
  REQUIRE(s.misses == 3);
  require_consistent(*store);
}

TEST_CASE("abort gives back the space and the key") {
  auto store = make_store(4096);
  auto r = store->reserve(key(1), 4096, 1);
  REQUIRE(r.ok());
  REQUIRE(store->stats().bytes_free == 0);
  REQUIRE(store->abort(key(1), r->id).ok());
  REQUIRE(store->stats().bytes_free == 4096);
  REQUIRE(store->commit(key(1), r->id).code() == ErrorCode::kNotFound);
  REQUIRE(put(*store, key(1), 4096).ok());
  auto s = store->stats();
  REQUIRE(s.aborts == 1);
  REQUIRE(s.reserves == 2);
  require_consistent(*store);
}

TEST_CASE("error paths return clear statuses and change nothing") {
  auto store = make_store(64 * 1024);
  auto k = key(1);
  SECTION("zero size and larger than the arena") {
    REQUIRE(store->reserve(k, 0, 1).status().code() == ErrorCode::kInvalidArgument);
    auto big = store->reserve(k, 64 * 1024 + 1, 1);
    REQUIRE(big.status().code() == ErrorCode::kInvalidArgument);
    REQUIRE(big.status().message().find("never fit") != std::string::npos);
  }
  SECTION("a key being stored or already stored") {
    auto r = store->reserve(k, 100, 1);
    REQUIRE(r.ok());
    REQUIRE(store->reserve(k, 100, 2).status().code() == ErrorCode::kAborted);
    REQUIRE(store->commit(k, r->id).ok());
    REQUIRE(store->reserve(k, 100, 2).status().code() == ErrorCode::kAborted);
  }
  SECTION("double commit, commit of an unknown key or reservation, abort after commit") {
    auto r = store->reserve(k, 100, 1);
    REQUIRE(r.ok());
    REQUIRE(store->commit(key(2), r->id).code() == ErrorCode::kNotFound);
    REQUIRE(store->commit(k, r->id + 1000).code() == ErrorCode::kNotFound);
    REQUIRE(store->commit(k, r->id).ok());
    REQUIRE(store->commit(k, r->id).code() == ErrorCode::kInvalidArgument);
    REQUIRE(store->abort(k, r->id).code() == ErrorCode::kInvalidArgument);
    REQUIRE(store->abort(key(3), 1).code() == ErrorCode::kNotFound);
  }
  SECTION("unknown leases, pins and unpins") {
    REQUIRE(store->release(12345).code() == ErrorCode::kNotFound);
    REQUIRE(store->acquire(k, 1).status().code() == ErrorCode::kNotFound);
    REQUIRE(store->pin(k).code() == ErrorCode::kNotFound);
    REQUIRE(store->unpin(k).code() == ErrorCode::kNotFound);
    REQUIRE(put(*store, k, 100).ok());
    REQUIRE(store->unpin(k).code() == ErrorCode::kInvalidArgument);
  }
  SECTION("bad options") {
    auto arena = gpudirect::MemoryRegion::allocate_host(nullptr, 4096);
    REQUIRE(arena.ok());
    ChunkStoreOptions options;
    options.alignment = 100;
    REQUIRE(ChunkStore::create(std::move(arena.value()), std::move(options)).status().code() ==
            ErrorCode::kInvalidArgument);
    auto arena2 = gpudirect::MemoryRegion::allocate_host(nullptr, 4096);
    ChunkStoreOptions zero_timeout;
    zero_timeout.lease_timeout = StoreClock::duration::zero();
    REQUIRE(ChunkStore::create(std::move(arena2.value()), std::move(zero_timeout)).status().code() ==
            ErrorCode::kInvalidArgument);
  }
  require_consistent(*store);
}

TEST_CASE("a reservation that is not committed in time is freed, and its late commit fails") {
  ManualClock clock;
  auto store = make_store(8192, &clock, 5s, 5s);
  auto r = store->reserve(key(1), 8192, 1);
  REQUIRE(r.ok());
  clock.now += 4s;
  REQUIRE(store->reap_expired(clock.now).reservations == 0);
  clock.now += 1s;  // deadline reached
  auto reaped = store->reap_expired(clock.now);
  REQUIRE(reaped.reservations == 1);
  REQUIRE(reaped.leases == 0);
  REQUIRE(store->stats().bytes_free == 8192);
  // Another writer takes the key; the first writer's late commit must not publish the new bytes.
  auto r2 = store->reserve(key(1), 8192, 2);
  REQUIRE(r2.ok());
  REQUIRE(store->commit(key(1), r->id).code() == ErrorCode::kNotFound);
  REQUIRE(store->commit(key(1), r2->id).ok());
  auto s = store->stats();
  REQUIRE(s.expired_reservations == 1);
  REQUIRE(s.entries == 1);
  require_consistent(*store);
}

TEST_CASE("a lease that expires stops protecting its entry and cannot be released") {
  ManualClock clock;
  auto store = make_store(4 * 1024, &clock, 5s, 5s);
  REQUIRE(put(*store, key(1), 4096).ok());
  auto lease = store->acquire(key(1), 3);
  REQUIRE(lease.ok());
  // Leased: a new chunk cannot take its place.
  REQUIRE(store->reserve(key(2), 4096, 1).status().code() == ErrorCode::kOutOfMemory);
  clock.now += 6s;
  REQUIRE(store->reap_expired(clock.now).leases == 1);
  REQUIRE(store->release(lease->id).code() == ErrorCode::kNotFound);
  REQUIRE(put(*store, key(2), 4096).ok());  // evicts key 1
  REQUIRE_FALSE(stored(*store, key(1)));
  auto s = store->stats();
  REQUIRE(s.expired_leases == 1);
  REQUIRE(s.evictions == 1);
  require_consistent(*store);
}

TEST_CASE("reserve reaps expired holds itself before reporting out of memory") {
  ManualClock clock;
  auto store = make_store(2 * 4096, &clock, 5s, 5s);
  REQUIRE(put(*store, key(1), 4096).ok());
  REQUIRE(store->acquire(key(1), 3).ok());
  REQUIRE(store->reserve(key(2), 4096, 4).ok());  // a writer that will die
  REQUIRE(store->reserve(key(3), 4096, 5).status().code() == ErrorCode::kOutOfMemory);
  clock.now += 10s;
  REQUIRE(put(*store, key(3), 4096).ok());
  auto s = store->stats();
  REQUIRE(s.expired_leases == 1);
  REQUIRE(s.expired_reservations == 1);
  require_consistent(*store);
}

TEST_CASE("LRU evicts the least recently used entry first") {
  auto store = make_store(4 * 1024);
  for (uint64_t i = 0; i < 4; ++i) REQUIRE(put(*store, key(i), 1024).ok());
  // Use 0, then 1 (under leases), and look 2 up (a lookup is a peek): 2 is now the oldest, then 3.
  for (uint64_t i : {0, 1}) {
    auto lease = store->acquire(key(i), 1);
    REQUIRE(lease.ok());
    REQUIRE(store->release(lease->id).ok());
  }
  ChunkKey k2[] = {key(2)};
  REQUIRE(store->lookup(k2) == 1);
  REQUIRE(put(*store, key(4), 1024).ok());
  REQUIRE_FALSE(stored(*store, key(2)));
  REQUIRE(put(*store, key(5), 1024).ok());
  REQUIRE_FALSE(stored(*store, key(3)));
  REQUIRE(put(*store, key(6), 1024).ok());
  REQUIRE_FALSE(stored(*store, key(0)));
  REQUIRE(stored(*store, key(1)));
  REQUIRE(store->stats().evictions == 3);
  require_consistent(*store);
}

TEST_CASE("LruPolicy orders keys by insertion and access and forgets removed ones") {
  LruPolicy lru;
  REQUIRE_FALSE(lru.victim());
  lru.on_insert(key(1));
  lru.on_insert(key(2));
  lru.on_insert(key(3));
  REQUIRE(*lru.victim() == key(1));
  lru.on_access(key(1));
  REQUIRE(*lru.victim() == key(2));
  lru.on_remove(key(2));
  REQUIRE(*lru.victim() == key(3));
  lru.on_access(key(42));  // unknown: ignored
  lru.on_remove(key(42));
  REQUIRE(lru.size() == 2);
  REQUIRE(lru.name() == "lru");
}

TEST_CASE("pinned entries survive pressure until unpinned as often as pinned") {
  auto store = make_store(16 * 1024);
  REQUIRE(put(*store, key(0), 1024).ok());
  REQUIRE(store->pin(key(0)).ok());
  REQUIRE(store->pin(key(0)).ok());
  for (uint64_t i = 1; i <= 200; ++i) REQUIRE(put(*store, key(i), 1024).ok());
  REQUIRE(stored(*store, key(0)));
  REQUIRE(store->stats().pinned == 1);
  REQUIRE(store->unpin(key(0)).ok());
  for (uint64_t i = 201; i <= 400; ++i) REQUIRE(put(*store, key(i), 1024).ok());
  REQUIRE(stored(*store, key(0)));  // one pin left
  REQUIRE(store->unpin(key(0)).ok());
  REQUIRE(store->stats().pinned == 0);
  for (uint64_t i = 401; i <= 420; ++i) REQUIRE(put(*store, key(i), 1024).ok());
  REQUIRE_FALSE(stored(*store, key(0)));
  require_consistent(*store);
}

TEST_CASE("out of memory when everything left is pinned, leased or being written") {
  auto store = make_store(4 * 1024);
  for (uint64_t i = 0; i < 2; ++i) {
    REQUIRE(put(*store, key(i), 1024).ok());
    REQUIRE(store->pin(key(i)).ok());
  }
  REQUIRE(put(*store, key(2), 1024).ok());
  auto lease = store->acquire(key(2), 1);
  REQUIRE(lease.ok());
  auto writing = store->reserve(key(3), 1024, 1);
  REQUIRE(writing.ok());
  auto full = store->reserve(key(4), 1024, 1);
  REQUIRE(full.status().code() == ErrorCode::kOutOfMemory);
  const std::string why = full.status().message();
  INFO(why);
  REQUIRE(why.find("2 entries pinned") != std::string::npos);
  REQUIRE(why.find("1 leased") != std::string::npos);
  REQUIRE(why.find("1 reservations") != std::string::npos);
  REQUIRE(store->stats().evictions == 0);
  // Releasing the lease makes room (the released entry is evicted).
  REQUIRE(store->release(lease->id).ok());
  REQUIRE(put(*store, key(4), 1024).ok());
  REQUIRE_FALSE(stored(*store, key(2)));
  require_consistent(*store);
}

TEST_CASE("mixed sizes: eviction goes on until a hole large enough coalesces") {
  auto store = make_store(16 * 1024);
  for (uint64_t i = 0; i < 16; ++i) REQUIRE(put(*store, key(i), 1024).ok());
  // Use every other entry so LRU frees non-adjacent blocks first.
  for (uint64_t i = 0; i < 16; i += 2) {
    auto lease = store->acquire(key(i), 1);
    REQUIRE(lease.ok());
    REQUIRE(store->release(lease->id).ok());
  }
  REQUIRE(put(*store, key(100), 3 * 1024).ok());
  auto s = store->stats();
  REQUIRE(s.evictions >= 3);
  require_consistent(*store);
}

TEST_CASE("clear removes entries; leased ones keep their bytes until released") {
  auto store = make_store(8 * 1024);
  for (uint64_t i = 0; i < 4; ++i) REQUIRE(put(*store, key(i), 1024).ok());
  REQUIRE(store->pin(key(0)).ok());
  auto lease = store->acquire(key(1), 1);
  REQUIRE(lease.ok());
  auto writing = store->reserve(key(9), 1024, 1);
  REQUIRE(writing.ok());

  ChunkKey some[] = {key(3), key(77)};
  auto one = store->clear(some);
  REQUIRE(one.removed == 1);
  REQUIRE(one.deferred == 0);
  REQUIRE(one.bytes == 1024);

  auto all = store->clear_all();
  REQUIRE(all.removed == 3);  // 0 (pinned), 1 (leased), 2
  REQUIRE(all.deferred == 1);
  REQUIRE(all.bytes == 3 * 1024);  // the leased entry's bytes count: they are freed on its release
  REQUIRE_FALSE(stored(*store, key(0)));
  REQUIRE_FALSE(stored(*store, key(1)));
  auto s = store->stats();
  REQUIRE(s.entries == 0);
  REQUIRE(s.detached == 1);
  REQUIRE(s.pinned == 0);
  REQUIRE(s.reservations == 1);  // untouched
  require_consistent(*store);

  // The reader still sees intact bytes, even after the key is stored again elsewhere.
  REQUIRE(put(*store, key(1), 2048).ok());
  REQUIRE(store->verify(lease.value()).ok());
  REQUIRE(store->release(lease->id).ok());
  REQUIRE(store->commit(key(9), writing->id).ok());
  s = store->stats();
  REQUIRE(s.detached == 0);
  REQUIRE(s.bytes_detached == 0);
  REQUIRE(s.cleared == 4);
  REQUIRE(s.entries == 2);
  require_consistent(*store);
}

TEST_CASE("clear_model removes exactly one model's entries, pinned and leased ones too") {
  auto store = make_store(64 * 1024);
  const ChunkKey model_a{0xa, 0xa1};
  const ChunkKey model_b{0xb, 0xb1};
  // Interleaved so that neither model's entries sit together in the arena or the LRU order.
  std::vector<ChunkKey> of_a, of_b, unattributed;
  for (uint64_t i = 0; i < 12; ++i) {
    const ChunkKey k = key(i);
    const ChunkKey& m = i % 3 == 0 ? model_a : i % 3 == 1 ? model_b : ChunkKey{};
    REQUIRE(put(*store, k, 1000 + i, 1, m).ok());
    (i % 3 == 0 ? of_a : i % 3 == 1 ? of_b : unattributed).push_back(k);
  }
  REQUIRE(store->peek(of_a[0])->model == model_a);
  REQUIRE(store->peek(of_b[0])->model == model_b);
  REQUIRE(store->peek(unattributed[0])->model.is_zero());
  REQUIRE(store->pin(of_a[1]).ok());
  REQUIRE(store->pin(of_b[1]).ok());
  auto lease_a = store->acquire(of_a[2], 1);
  REQUIRE(lease_a.ok());
  REQUIRE(lease_a->model == model_a);
  auto lease_b = store->acquire(of_b[2], 1);
  REQUIRE(lease_b.ok());
  // A reservation of model a in progress is not an entry yet: clear leaves it alone.
  auto writing = store->reserve(key(50), 1000, 1, model_a);
  REQUIRE(writing.ok());

  const auto r = store->clear_model(model_a);
  CHECK(r.removed == of_a.size());
  CHECK(r.deferred == 1);  // of_a[2] is leased
  CHECK(r.bytes == of_a.size() * 1024);
  for (const auto& k : of_a) CHECK_FALSE(store->peek(k).has_value());
  for (const auto& k : of_b) CHECK(store->peek(k).has_value());
  for (const auto& k : unattributed) CHECK(store->peek(k).has_value());
  CHECK(store->peek(of_b[1])->pins == 1);
  CHECK(store->peek(of_b[2])->leases == 1);
  auto s = store->stats();
  CHECK(s.entries == of_b.size() + unattributed.size());
  CHECK(s.pinned == 1);
  CHECK(s.detached == 1);
  CHECK(s.cleared == of_a.size());
  CHECK(s.reservations == 1);
  require_consistent(*store);
  // The leased reader of a cleared entry still reads intact bytes.
  REQUIRE(store->verify(lease_a.value()).ok());
  REQUIRE(store->release(lease_a->id).ok());

  // The reservation commits after the clear: a later clear of the model takes it.
  REQUIRE(store->commit(key(50), writing->id).ok());
  CHECK(store->clear_model(ChunkKey{0xdead, 0xbeef}).removed == 0);  // a model nothing was stored under
  const auto again = store->clear_model(model_a);
  CHECK(again.removed == 1);
  CHECK_FALSE(store->peek(key(50)).has_value());

  // The zero fingerprint names the entries stored without a model, and only those.
  const auto none = store->clear_model(ChunkKey{});
  CHECK(none.removed == unattributed.size());
  for (const auto& k : of_b) CHECK(store->peek(k).has_value());
  const EntryTotals t = store->totals();
  CHECK(t.entries == of_b.size());
  uint64_t b_bytes = 0;
  for (const auto& k : of_b) b_bytes += store->peek(k)->bytes;
  CHECK(t.bytes == b_bytes);
  REQUIRE(store->release(lease_b->id).ok());
  require_consistent(*store);
}

TEST_CASE("peek and totals count nothing: no hits, misses or LRU use") {
  auto store = make_store(4 * 1024);
  for (uint64_t i = 0; i < 4; ++i) REQUIRE(put(*store, key(i), 1000).ok());
  const auto before = store->stats();
  REQUIRE(store->peek(key(0)).has_value());  // the LRU victim: a peek must not make it recent
  REQUIRE_FALSE(store->peek(key(99)).has_value());
  CHECK(store->totals().entries == 4);
  CHECK(store->totals().bytes == 4000);
  const auto after = store->stats();
  CHECK(after.hits == before.hits);
  CHECK(after.misses == before.misses);
  REQUIRE(put(*store, key(10), 1000).ok());  // evicts the least recently used: key(0)
  CHECK_FALSE(store->peek(key(0)).has_value());
  CHECK(store->peek(key(1)).has_value());
}

TEST_CASE("drop_client frees the reservations and leases of a connection at once") {
  auto store = make_store(8 * 1024);
  REQUIRE(put(*store, key(0), 1024).ok());
  REQUIRE(store->acquire(key(0), 5).ok());
  REQUIRE(store->acquire(key(0), 5).ok());
  auto other = store->acquire(key(0), 6);
  REQUIRE(other.ok());
  REQUIRE(store->reserve(key(1), 1024, 5).ok());
  REQUIRE(store->reserve(key(2), 1024, 6).ok());
  auto dropped = store->drop_client(5);
  REQUIRE(dropped.reservations == 1);
  REQUIRE(dropped.leases == 2);
  auto s = store->stats();
  REQUIRE(s.active_leases == 1);
  REQUIRE(s.reservations == 1);
  REQUIRE(s.dropped_leases == 2);
  REQUIRE(s.dropped_reservations == 1);
  REQUIRE(store->release(other->id).ok());
  require_consistent(*store);
}

namespace {

// A random sequence of every store operation with an audit after each; with `ssd`, over an SSD
// tier, and with re-encodes (replacements) in the mix.
void random_sequence(std::optional<SsdMode> ssd, bool replacements) {
  ManualClock clock;
  auto store = !ssd ? make_store(32 * 1024, &clock, 3s, 3s)
                    : make_store(32 * 1024, &clock, 3s, 3s, ssd_file(*ssd, 64 * 1024));
  std::mt19937_64 rng(2024);
  std::vector<Reservation> open;
  std::vector<Reservation> replacing;
  std::vector<uint64_t> leases;
  for (int step = 0; step < 4000; ++step) {
    auto k = key(rng() % 64);
    switch (rng() % (replacements ? 11 : 10)) {
      case 0:
      case 1: {
        auto r = store->reserve(k, 1 + rng() % 4000, rng() % 3, ChunkKey{0, k.lo % 3},  // 3 models
                                static_cast<KvCodec>(rng() % 3));
        if (r.ok()) open.push_back(r.value());
        break;
      }
      case 2:
        if (!open.empty()) {
          size_t i = rng() % open.size();
          auto r = open[i];
          open.erase(open.begin() + static_cast<long>(i));
          (void)(rng() % 4 == 0 ? store->abort(r.key, r.id) : store->commit(r.key, r.id));
        }
        break;
      case 3: {
        auto l = store->acquire(k, rng() % 3);
        if (l.ok()) {
          leases.push_back(l->id);
          REQUIRE(store->verify(l.value()).ok());  // promoted or not, the bytes are the committed ones
        }
        break;
      }
      case 4:
        if (!leases.empty()) {
          size_t i = rng() % leases.size();
          (void)store->release(leases[i]);
          leases.erase(leases.begin() + static_cast<long>(i));
        }
        break;
      case 5:
        (void)(rng() % 2 ? store->pin(k) : store->unpin(k));
        break;
      case 6: {
        std::vector<ChunkKey> chain = {k, key(rng() % 64), key(rng() % 64)};
        (void)store->lookup(chain);
        break;
      }
      case 7:
        if (rng() % 20 == 0) {
          (void)store->clear_all();
        } else if (rng() % 10 == 0) {
          const ChunkKey model{0, rng() % 3};
          (void)store->clear_model(model);
          // None of that model's committed entries is left, in either tier.
          for (uint64_t i = 0; i < 64; ++i) {
            const auto info = store->peek(key(i));
            REQUIRE_FALSE((info && info->model == model));
          }
        } else {
          ChunkKey one[] = {k};
          (void)store->clear(one);
        }
        break;
      case 8:
        clock.now += std::chrono::milliseconds(rng() % 500);
        (void)store->reap_expired(clock.now);
        break;
      case 9:
        if (rng() % 10 == 0) (void)store->drop_client(rng() % 3);
        break;
      case 10:
        if (!replacing.empty() && rng() % 2 == 0) {
          size_t i = rng() % replacing.size();
          auto r = replacing[i];
          replacing.erase(replacing.begin() + static_cast<long>(i));
          (void)(rng() % 4 == 0 ? store->abort(r.key, r.id) : store->commit_replacement(r.key, r.id));
        } else {
          // Mostly a stored key (few are stored at a time here), sometimes any.
          for (uint64_t i = 0, start = rng(); i < 64 && rng() % 8 != 0; ++i) {
            if (store->peek(key((start + i) % 64))) {
              k = key((start + i) % 64);
              break;
            }
          }
          auto r = store->reserve_replacement(k, 1 + rng() % 2000, KvCodec::kInt8, rng() % 3);
          if (r.ok()) replacing.push_back(r.value());
        }
        break;
    }
    Status audit = store->audit();
    INFO("step " << step << ": " << audit.to_string());
    REQUIRE(audit.ok());
  }
  auto s = store->stats();
  // The sequence must have exercised the interesting paths.
  REQUIRE(s.inserts > 0);
  REQUIRE(s.evictions > 0);
  REQUIRE(s.cleared > 0);
  REQUIRE(s.expired_leases + s.expired_reservations > 0);
  if (ssd) {
    REQUIRE(s.ssd_spills > 0);
    REQUIRE(s.promotions > 0);
    REQUIRE(s.ssd_cleared > 0);
  }
  if (replacements) REQUIRE(s.replacements > 0);
}

}  // namespace

TEST_CASE("stats add up after every operation of a random sequence") {
  random_sequence(std::nullopt, false);
}

TEST_CASE("stats add up after every operation of a random sequence with re-encodes") {
  random_sequence(std::nullopt, true);
}

TEST_CASE("stats add up after every operation of a random sequence over an SSD tier, with re-encodes") {
  for (const auto& mode : ssd_modes()) {
    INFO("ssd tier: " << mode.name());
    random_sequence(mode, true);
  }
}

// --- the SSD tier -------------------------------------------------------------------------------

TEST_CASE(
    "ssd tier: evictions spill, acquire promotes, and the bytes come back verified into poisoned blocks") {
  for (const auto& mode : ssd_modes()) {
    INFO("ssd tier: " << mode.name());
    constexpr uint64_t kChunk = 64 * 1024 + 100;  // not a whole number of 4 KiB blocks
    auto store = make_ssd_store(16 * (kChunk + 256), mode, 8 << 20);
    std::vector<ChunkKey> keys;
    for (uint64_t i = 0; i < 40; ++i) {
      keys.push_back(key(i));
      REQUIRE(put(*store, keys.back(), kChunk).ok());
      require_consistent(*store);
    }
    auto s = store->stats();
    CHECK(s.entries == 16);
    CHECK(s.evictions == 24);
    CHECK(s.ssd_spills == 24);
    CHECK(s.ssd_entries == 24);
    CHECK(s.ssd_spill_failures == 0);
    CHECK(s.ssd_bytes_entries == 24 * ((kChunk + 4095) / 4096 * 4096));
    CHECK(s.ssd_bytes_written >= 24 * kChunk);
    // The chain reaches across both tiers; each key says where it is.
    const auto tiers = store->lookup_tiers(keys);
    REQUIRE(tiers.size() == 40);
    for (size_t i = 0; i < 40; ++i) CHECK(tiers[i] == (i < 24 ? Tier::kSsd : Tier::kDram));
    CHECK(store->lookup(keys) == 40);
    s = store->stats();
    CHECK(s.ssd_hits == 48);
    CHECK(s.hits == 32);
    CHECK(store->totals().entries == 40);
    CHECK(store->totals().bytes == 40 * kChunk);
    // Poison: 16 chunks of 0xEE fill the arena and push every real chunk to the SSD.
    for (uint64_t i = 0; i < 16; ++i) {
      auto r = store->reserve(key(1000 + i), kChunk, 9);
      REQUIRE(r.ok());
      std::fill(store->bytes(r.value()).begin(), store->bytes(r.value()).end(), uint8_t{0xEE});
      REQUIRE(store->commit(key(1000 + i), r->id).ok());
    }
    CHECK(store->stats().ssd_entries == 40);
    for (const auto& k : keys) CHECK(tier_of(*store, k) == Tier::kSsd);
    // Every real chunk promoted back lands in a block that held poison (or another chunk).
    for (size_t i = 0; i < keys.size(); ++i) {
      auto lease = store->acquire(keys[i], 3);
      INFO("chunk " << i << ": " << lease.status().to_string());
      REQUIRE(lease.ok());
      const auto expected = content(keys[i], kChunk);
      auto got = store->bytes(lease.value());
      REQUIRE(std::equal(got.begin(), got.end(), expected.begin(), expected.end()));
      REQUIRE(store->verify(lease.value()).ok());
      CHECK(tier_of(*store, keys[i]) == Tier::kDram);
      REQUIRE(store->release(lease->id).ok());
      require_consistent(*store);
    }
    s = store->stats();
    CHECK(s.promotions == 40);
    CHECK(s.ssd_dropped == 0);
    CHECK(s.ssd_bytes_read >= 40 * kChunk);
    CHECK(s.promoting == 0);
    // Promoted entries left the SSD tier; what is there now is what the promotions evicted.
    CHECK(s.ssd_entries + s.entries == 56);
  }
}

TEST_CASE("ssd tier: the codec and model survive spill and promotion") {
  auto store = make_ssd_store(4 * 4096, ssd_modes().front(), 1 << 20);
  auto r = store->reserve(key(1), 4000, 1, key(77), KvCodec::kInt4);
  REQUIRE(r.ok());
  auto data = content(key(1), 4000);
  std::copy(data.begin(), data.end(), store->bytes(r.value()).begin());
  REQUIRE(store->commit(key(1), r->id).ok());
  for (uint64_t i = 2; i < 8; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  auto info = store->peek(key(1));
  REQUIRE(info);
  CHECK(info->tier == Tier::kSsd);
  CHECK(info->codec == KvCodec::kInt4);
  CHECK(info->model == key(77));
  CHECK(info->bytes == 4000);
  auto lease = store->acquire(key(1), 2);
  REQUIRE(lease.ok());
  CHECK(lease->codec == KvCodec::kInt4);
  CHECK(lease->model == key(77));
  CHECK(store->verify(lease.value()).ok());
  info = store->peek(key(1));
  CHECK(info->tier == Tier::kDram);
  CHECK(info->leases == 1);
  REQUIRE(store->release(lease->id).ok());
  require_consistent(*store);
}

TEST_CASE("ssd tier: a corrupted file is detected on promotion and the entry dropped") {
  for (const auto& mode : ssd_modes()) {
    INFO("ssd tier: " << mode.name());
    auto store = make_ssd_store(4 * 4096, mode, 1 << 20);
    for (uint64_t i = 0; i < 8; ++i) REQUIRE(put(*store, key(i), 4000).ok());
    REQUIRE(tier_of(*store, key(0)) == Tier::kSsd);
    const SsdEntry* e = store->ssd_tier()->find(key(0));  // one thread: nothing else touches the index
    REQUIRE(e != nullptr);
    const int fd = ::open(store->ssd_tier()->path().c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    const uint8_t bad = static_cast<uint8_t>(content(key(0), 4000)[123] ^ 1);
    REQUIRE(::pwrite(fd, &bad, 1, static_cast<off_t>(e->extent.offset + 123)) == 1);
    ::close(fd);
    auto lease = store->acquire(key(0), 1);
    REQUIRE(!lease.ok());
    CHECK(lease.status().code() == ErrorCode::kVerifyFailed);
    auto s = store->stats();
    CHECK(s.ssd_dropped == 1);
    CHECK(s.promotions == 0);
    CHECK_FALSE(store->peek(key(0)).has_value());
    CHECK(store->acquire(key(0), 1).status().code() == ErrorCode::kNotFound);
    require_consistent(*store);
    // The key is free again: a writer can store it afresh.
    REQUIRE(put(*store, key(0), 4000).ok());
    auto again = store->acquire(key(0), 1);
    REQUIRE(again.ok());
    CHECK(store->verify(again.value()).ok());
    REQUIRE(store->release(again->id).ok());
    require_consistent(*store);
  }
}

TEST_CASE("ssd tier: a full SSD tier evicts its least recently spilled entries") {
  auto store = make_ssd_store(4 * 65536, ssd_modes().front(), 8 * 65536);
  std::vector<ChunkKey> keys;
  for (uint64_t i = 0; i < 20; ++i) {
    keys.push_back(key(i));
    REQUIRE(put(*store, key(i), 65536).ok());
  }
  for (uint64_t i = 0; i < 8; ++i) CHECK_FALSE(store->peek(key(i)).has_value());
  for (uint64_t i = 8; i < 16; ++i) CHECK(tier_of(*store, key(i)) == Tier::kSsd);
  for (uint64_t i = 16; i < 20; ++i) CHECK(tier_of(*store, key(i)) == Tier::kDram);
  auto s = store->stats();
  CHECK(s.evictions == 16);
  CHECK(s.ssd_spills == 16);
  CHECK(s.ssd_evictions == 8);
  CHECK(s.ssd_entries == 8);
  CHECK(s.ssd_bytes_free == 0);
  // A chain that starts with an evicted key matches nothing: one miss in both tiers.
  CHECK(store->lookup(keys) == 0);
  CHECK(store->stats().misses == s.misses + 1);
  CHECK(store->stats().ssd_misses == s.ssd_misses + 1);
  const std::vector<ChunkKey> tail(keys.begin() + 8, keys.end());
  const auto tiers = store->lookup_tiers(tail);
  REQUIRE(tiers.size() == 12);
  CHECK(tiers.front() == Tier::kSsd);
  CHECK(tiers.back() == Tier::kDram);
  require_consistent(*store);
}

TEST_CASE("ssd tier: pin promotes and keeps the entry in DRAM; pinned and leased entries never spill") {
  auto store = make_ssd_store(4 * 4096, ssd_modes().front(), 1 << 20);
  for (uint64_t i = 0; i < 8; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  REQUIRE(tier_of(*store, key(0)) == Tier::kSsd);
  CHECK(store->unpin(key(0)).code() == ErrorCode::kInvalidArgument);  // in the SSD tier: not pinned
  REQUIRE(store->pin(key(0)).ok());
  CHECK(tier_of(*store, key(0)) == Tier::kDram);
  CHECK(store->peek(key(0))->pins == 1);
  auto lease = store->acquire(key(1), 5);  // promoted and leased
  REQUIRE(lease.ok());
  for (uint64_t i = 10; i < 30; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  CHECK(tier_of(*store, key(0)) == Tier::kDram);
  CHECK(tier_of(*store, key(1)) == Tier::kDram);
  CHECK(store->verify(lease.value()).ok());
  REQUIRE(store->release(lease->id).ok());
  REQUIRE(store->unpin(key(0)).ok());
  for (uint64_t i = 30; i < 40; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  CHECK(tier_of(*store, key(0)) == Tier::kSsd);  // unpinned: spilled like any other
  CHECK(store->pin(key(99)).code() == ErrorCode::kNotFound);
  require_consistent(*store);
}

TEST_CASE("ssd tier: clear, clear_model and clear_all reach both tiers; reserve of an SSD key is kAborted") {
  auto store = make_ssd_store(4 * 4096, ssd_modes().front(), 1 << 20);
  for (uint64_t i = 0; i < 12; ++i) REQUIRE(put(*store, key(i), 4000, 1, ChunkKey{0, i % 2}).ok());
  REQUIRE(tier_of(*store, key(0)) == Tier::kSsd);
  REQUIRE(tier_of(*store, key(11)) == Tier::kDram);
  CHECK(store->reserve(key(0), 4000, 1).status().code() == ErrorCode::kAborted);
  CHECK(store->reserve(key(11), 4000, 1).status().code() == ErrorCode::kAborted);
  const ChunkKey two[] = {key(0), key(11)};
  auto r = store->clear(two);
  CHECK(r.removed == 2);
  CHECK(r.bytes == 4096 + 4096);  // an SSD extent and an arena block
  auto s = store->stats();
  CHECK(s.ssd_cleared == 1);
  CHECK(s.cleared == 1);
  require_consistent(*store);
  r = store->clear_model(ChunkKey{0, 1});  // keys 1, 3, 5, 7, 9 (11 is gone)
  CHECK(r.removed == 5);
  for (uint64_t i = 1; i < 11; i += 2) CHECK_FALSE(store->peek(key(i)).has_value());
  require_consistent(*store);
  r = store->clear_all();
  CHECK(r.removed == 5);  // 2, 4, 6, 8, 10
  s = store->stats();
  CHECK(s.entries == 0);
  CHECK(s.ssd_entries == 0);
  CHECK(s.ssd_bytes_used == 0);
  CHECK(store->totals().entries == 0);
  require_consistent(*store);
}

TEST_CASE("ssd tier: concurrent readers promote in parallel and wait for each other's promotions") {
  for (const auto& mode : ssd_modes()) {
    INFO("ssd tier: " << mode.name());
    constexpr uint64_t kChunk = 20000;
    auto store = make_ssd_store(12 * (kChunk + 256), mode, 4 << 20);
    for (uint64_t i = 0; i < 48; ++i) REQUIRE(put(*store, key(i), kChunk).ok());
    std::atomic<int> bad{0};
    std::atomic<int> errors{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(static_cast<uint64_t>(t) + 1);
        for (int n = 0; n < 300; ++n) {
          const ChunkKey k = key(rng() % 48);
          auto lease = store->acquire(k, static_cast<ClientId>(t));
          if (!lease.ok()) {
            ++errors;
            continue;
          }
          const auto expected = content(k, kChunk);
          auto got = store->bytes(lease.value());
          if (!std::equal(got.begin(), got.end(), expected.begin(), expected.end())) ++bad;
          if (!store->release(lease->id).ok()) ++errors;
          if (n % 50 == 0) (void)store->lookup_tiers(std::vector<ChunkKey>{k, key(rng() % 48)});
        }
      });
    }
    for (auto& t : threads) t.join();
    CHECK(bad == 0);
    CHECK(errors == 0);
    auto s = store->stats();
    CHECK(s.promotions > 100);
    CHECK(s.ssd_dropped == 0);
    require_consistent(*store);
  }
}

TEST_CASE("ssd tier: an SSD file that cannot be created fails the store's creation") {
  auto arena = gpudirect::MemoryRegion::allocate_host(nullptr, 1 << 20);
  REQUIRE(arena.ok());
  ChunkStoreOptions options;
  options.ssd = SsdTierOptions{};
  options.ssd->path = "/nonexistent-kvf-dir/tier.ssd";
  options.ssd->capacity = 1 << 20;
  auto store = ChunkStore::create(std::move(arena.value()), std::move(options));
  REQUIRE(!store.ok());
  CHECK(store.status().message().find("/nonexistent-kvf-dir/tier.ssd") != std::string::npos);
}

// --- re-encoding entries (reserve_replacement / commit_replacement) -----------------------------

TEST_CASE("replacement: new bytes and codec swap in at once; old leases keep the old bytes; pins stay") {
  auto store = make_store(64 * 1024);
  REQUIRE(put(*store, key(1), 10000, 1, key(5)).ok());
  REQUIRE(store->pin(key(1)).ok());
  auto old_lease = store->acquire(key(1), 2);
  REQUIRE(old_lease.ok());
  CHECK(old_lease->codec == KvCodec::kIdentity);
  auto r = store->reserve_replacement(key(1), 3000, KvCodec::kZstd, 3);
  REQUIRE(r.ok());
  CHECK(store->reserve_replacement(key(1), 3000, KvCodec::kZstd, 3).status().code() == ErrorCode::kAborted);
  const auto fresh = content(key(2), 3000);
  std::copy(fresh.begin(), fresh.end(), store->bytes(r.value()).begin());
  CHECK(store->peek(key(1))->codec == KvCodec::kIdentity);  // unchanged until the commit
  CHECK(store->peek(key(1))->bytes == 10000);
  CHECK(store->stats().reservations == 1);
  require_consistent(*store);
  // A wrong expected checksum leaves the replacement reserved.
  CHECK(store->commit_replacement(key(1), r->id, 12345).code() == ErrorCode::kVerifyFailed);
  REQUIRE(store->commit_replacement(key(1), r->id).ok());
  CHECK(store->commit_replacement(key(1), r->id).code() == ErrorCode::kNotFound);
  auto info = store->peek(key(1));
  CHECK(info->bytes == 3000);
  CHECK(info->codec == KvCodec::kZstd);
  CHECK(info->pins == 1);
  CHECK(info->model == key(5));
  CHECK(info->leases == 0);  // the old lease holds the old bytes, not the entry
  // The old lease still reads the old bytes, which match its checksum.
  CHECK(store->verify(old_lease.value()).ok());
  const auto old_bytes = content(key(1), 10000);
  auto got = store->bytes(old_lease.value());
  CHECK(std::equal(got.begin(), got.end(), old_bytes.begin(), old_bytes.end()));
  auto s = store->stats();
  CHECK(s.detached == 1);
  CHECK(s.replacements == 1);
  CHECK(s.reservations == 0);
  require_consistent(*store);
  auto new_lease = store->acquire(key(1), 2);
  REQUIRE(new_lease.ok());
  CHECK(new_lease->codec == KvCodec::kZstd);
  CHECK(new_lease->length == 3000);
  CHECK(new_lease->checksum == chunk_checksum(fresh.data(), fresh.size()));
  CHECK(store->verify(new_lease.value()).ok());
  REQUIRE(store->release(old_lease->id).ok());
  s = store->stats();
  CHECK(s.detached == 0);
  CHECK(s.bytes_used == 3072);  // only the new bytes are left
  REQUIRE(store->release(new_lease->id).ok());
  require_consistent(*store);
}

TEST_CASE("replacement: abort, expiry, drop_client and a clear meanwhile end it; errors are clear") {
  ManualClock clock;
  auto store = make_store(64 * 1024, &clock, 2s, 10s);
  REQUIRE(put(*store, key(1), 4000).ok());
  CHECK(store->reserve_replacement(key(9), 100, KvCodec::kInt8, 1).status().code() == ErrorCode::kNotFound);
  CHECK(store->reserve_replacement(key(1), 0, KvCodec::kInt8, 1).status().code() ==
        ErrorCode::kInvalidArgument);
  auto r = store->reserve_replacement(key(1), 1000, KvCodec::kInt8, 1);
  REQUIRE(r.ok());
  REQUIRE(store->abort(key(1), r->id).ok());
  CHECK(store->peek(key(1))->codec == KvCodec::kIdentity);
  require_consistent(*store);

  r = store->reserve_replacement(key(1), 1000, KvCodec::kInt8, 1);
  REQUIRE(r.ok());
  clock.now += 3s;
  CHECK(store->reap_expired(clock.now).reservations == 1);
  CHECK(store->commit_replacement(key(1), r->id).code() == ErrorCode::kNotFound);
  CHECK(store->stats().expired_reservations == 1);
  require_consistent(*store);

  r = store->reserve_replacement(key(1), 1000, KvCodec::kInt8, 4);
  REQUIRE(r.ok());
  CHECK(store->drop_client(4).reservations == 1);
  CHECK(store->stats().dropped_reservations == 1);
  require_consistent(*store);

  r = store->reserve_replacement(key(1), 1000, KvCodec::kInt8, 1);
  REQUIRE(r.ok());
  const ChunkKey one[] = {key(1)};
  CHECK(store->clear(one).removed == 1);
  CHECK(store->commit_replacement(key(1), r->id).code() == ErrorCode::kNotFound);
  auto s = store->stats();
  CHECK(s.reservations == 0);
  CHECK(s.bytes_used == 0);
  require_consistent(*store);
}

TEST_CASE("replacement: an entry being re-encoded is not evicted") {
  auto store = make_store(4 * 1024);
  REQUIRE(put(*store, key(1), 1000).ok());
  auto r = store->reserve_replacement(key(1), 500, KvCodec::kFp8, 1);
  REQUIRE(r.ok());
  for (uint64_t i = 10; i < 20; ++i) REQUIRE(put(*store, key(i), 1000).ok());
  CHECK(store->peek(key(1)).has_value());
  CHECK(store->stats().protected_entries == 1);
  REQUIRE(store->commit_replacement(key(1), r->id).ok());
  CHECK(store->stats().protected_entries == 0);
  require_consistent(*store);
}

TEST_CASE("replacement: an entry in the SSD tier is promoted first; the new codec spills with it") {
  auto store = make_ssd_store(4 * 4096, ssd_modes().front(), 1 << 20);
  for (uint64_t i = 0; i < 8; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  REQUIRE(tier_of(*store, key(0)) == Tier::kSsd);
  auto r = store->reserve_replacement(key(0), 2000, KvCodec::kLz4, 1);
  REQUIRE(r.ok());
  CHECK(tier_of(*store, key(0)) == Tier::kDram);
  const auto fresh = content(key(100), 2000);
  std::copy(fresh.begin(), fresh.end(), store->bytes(r.value()).begin());
  REQUIRE(store->commit_replacement(key(0), r->id).ok());
  for (uint64_t i = 10; i < 20; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  REQUIRE(tier_of(*store, key(0)) == Tier::kSsd);
  CHECK(store->peek(key(0))->codec == KvCodec::kLz4);
  auto lease = store->acquire(key(0), 1);
  REQUIRE(lease.ok());
  CHECK(lease->codec == KvCodec::kLz4);
  auto got = store->bytes(lease.value());
  CHECK(std::equal(got.begin(), got.end(), fresh.begin(), fresh.end()));
  REQUIRE(store->release(lease->id).ok());
  require_consistent(*store);
}

// --- reuse counts, entries(), demote ------------------------------------------------------------

namespace {

uint64_t loads_of(ChunkStore& store, const ChunkKey& k) {
  auto info = store.peek(k);
  REQUIRE(info.has_value());
  return info->loads;
}

void acquire_release(ChunkStore& store, const ChunkKey& k, uint64_t bytes) {
  auto lease = store.acquire(k, 7);
  REQUIRE(lease.ok());
  const auto expected = content(k, bytes);
  auto got = store.bytes(lease.value());
  REQUIRE(std::equal(got.begin(), got.end(), expected.begin(), expected.end()));
  REQUIRE(store.verify(lease.value()).ok());
  REQUIRE(store.release(lease->id).ok());
}

}  // namespace

TEST_CASE("loads: acquires count, lookups and pins do not; kept through spill, promotion and re-encode") {
  auto store = make_ssd_store(4 * 4096, ssd_modes().front(), 1 << 20);
  REQUIRE(put(*store, key(0), 4000).ok());
  CHECK(loads_of(*store, key(0)) == 0);
  for (int i = 0; i < 3; ++i) acquire_release(*store, key(0), 4000);
  CHECK(loads_of(*store, key(0)) == 3);
  ChunkKey one[] = {key(0)};
  CHECK(store->lookup(one) == 1);
  REQUIRE(store->pin(key(0)).ok());
  REQUIRE(store->unpin(key(0)).ok());
  CHECK(loads_of(*store, key(0)) == 3);
  CHECK(store->acquire(key(99), 7).status().code() == ErrorCode::kNotFound);
  // Spilled: the SSD copy keeps the count.
  for (uint64_t i = 1; i < 8; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  REQUIRE(tier_of(*store, key(0)) == Tier::kSsd);
  CHECK(loads_of(*store, key(0)) == 3);
  // The acquire that promotes it counts.
  acquire_release(*store, key(0), 4000);
  CHECK(tier_of(*store, key(0)) == Tier::kDram);
  CHECK(loads_of(*store, key(0)) == 4);
  // A re-encode keeps it, with a lease held across the swap too.
  auto lease = store->acquire(key(0), 8);
  REQUIRE(lease.ok());
  auto r = store->reserve_replacement(key(0), 2000, KvCodec::kLz4, 1);
  REQUIRE(r.ok());
  REQUIRE(store->commit_replacement(key(0), r->id).ok());
  CHECK(loads_of(*store, key(0)) == 5);
  REQUIRE(store->release(lease->id).ok());
  CHECK(loads_of(*store, key(0)) == 5);
  // Spilled and promoted once more (by demote this time).
  REQUIRE(store->demote(key(0)).ok());
  CHECK(tier_of(*store, key(0)) == Tier::kSsd);
  CHECK(loads_of(*store, key(0)) == 5);
  auto again = store->acquire(key(0), 9);
  REQUIRE(again.ok());
  CHECK(loads_of(*store, key(0)) == 6);
  REQUIRE(store->release(again->id).ok());
  // A key stored again after a clear starts from zero.
  ChunkKey k0[] = {key(0)};
  CHECK(store->clear(k0).removed == 1);
  REQUIRE(put(*store, key(0), 4000).ok());
  CHECK(loads_of(*store, key(0)) == 0);
  require_consistent(*store);
}

TEST_CASE("entries: every committed entry of both tiers with its tier, codec, bytes and loads") {
  auto store = make_ssd_store(4 * 4096, ssd_modes().front(), 1 << 20);
  CHECK(store->entries().empty());
  for (uint64_t i = 0; i < 8; ++i) {
    auto r = store->reserve(key(i), 3000 + i, 1, key(50), i % 2 == 0 ? KvCodec::kIdentity : KvCodec::kFp8);
    REQUIRE(r.ok());
    REQUIRE(store->commit(key(i), r->id).ok());
  }
  auto open = store->reserve(key(100), 500, 1);  // reserved, not committed: not listed
  REQUIRE(open.ok());
  auto held = store->acquire(key(7), 7);
  REQUIRE(held.ok());
  REQUIRE(store->release(held->id).ok());
  const auto list = store->entries();
  CHECK(list.size() == 8);
  CHECK(store->totals().entries == 8);
  size_t dram = 0;
  size_t on_ssd = 0;
  for (const auto& [k, info] : list) {
    uint64_t i = 0;
    while (i < 8 && !(k == key(i))) ++i;
    REQUIRE(i < 8);
    CHECK(info.bytes == 3000 + i);
    CHECK(info.codec == (i % 2 == 0 ? KvCodec::kIdentity : KvCodec::kFp8));
    CHECK(info.model == key(50));
    CHECK(info.tier == store->peek(k)->tier);
    CHECK(info.loads == (i == 7 ? 1u : 0u));
    (info.tier == Tier::kDram ? dram : on_ssd)++;
  }
  CHECK(dram == store->stats().entries);
  CHECK(on_ssd == store->stats().ssd_entries);
  CHECK(on_ssd > 0);
  CHECK(dram > 0);
  REQUIRE(store->abort(key(100), open->id).ok());
  require_consistent(*store);
}

TEST_CASE("demote: moves a DRAM entry to the SSD tier; held ones stay; errors say why") {
  for (const auto& mode : ssd_modes()) {
    INFO("ssd tier: " << mode.name());
    constexpr uint64_t kChunk = 10000;
    auto store = make_ssd_store(8 * (kChunk + 256), mode, 1 << 20);
    for (uint64_t i = 0; i < 4; ++i) REQUIRE(put(*store, key(i), kChunk).ok());
    acquire_release(*store, key(0), kChunk);
    const uint64_t used = store->stats().bytes_used;
    const auto before = store->stats();
    REQUIRE(store->demote(key(0)).ok());
    require_consistent(*store);
    ChunkKey one[] = {key(0)};
    auto tiers = store->lookup_tiers(one);
    REQUIRE(tiers.size() == 1);
    CHECK(tiers[0] == Tier::kSsd);
    auto s = store->stats();
    CHECK(s.bytes_used == used - (kChunk + 255) / 256 * 256);  // its arena block is free
    CHECK(s.entries == 3);
    CHECK(s.ssd_entries == 1);
    CHECK(s.evictions == before.evictions + 1);
    CHECK(s.ssd_spills == before.ssd_spills + 1);
    // Already in the SSD tier: nothing to do.
    REQUIRE(store->demote(key(0)).ok());
    CHECK(store->stats().ssd_spills == s.ssd_spills);
    // Acquire promotes it back, bytes identical.
    acquire_release(*store, key(0), kChunk);
    CHECK(tier_of(*store, key(0)) == Tier::kDram);
    CHECK(loads_of(*store, key(0)) == 2);
    require_consistent(*store);
    // Pinned, leased, being re-encoded: kAborted, and they stay in DRAM.
    REQUIRE(store->pin(key(1)).ok());
    Status st = store->demote(key(1));
    CHECK(st.code() == ErrorCode::kAborted);
    CHECK(st.message().find("pinned") != std::string::npos);
    CHECK(tier_of(*store, key(1)) == Tier::kDram);
    auto lease = store->acquire(key(2), 3);
    REQUIRE(lease.ok());
    st = store->demote(key(2));
    CHECK(st.code() == ErrorCode::kAborted);
    CHECK(st.message().find("leased") != std::string::npos);
    CHECK(tier_of(*store, key(2)) == Tier::kDram);
    CHECK(store->verify(lease.value()).ok());
    auto r = store->reserve_replacement(key(3), 500, KvCodec::kLz4, 1);
    REQUIRE(r.ok());
    st = store->demote(key(3));
    CHECK(st.code() == ErrorCode::kAborted);
    CHECK(st.message().find("re-encoded") != std::string::npos);
    CHECK(tier_of(*store, key(3)) == Tier::kDram);
    require_consistent(*store);
    REQUIRE(store->abort(key(3), r->id).ok());
    REQUIRE(store->release(lease->id).ok());
    REQUIRE(store->unpin(key(1)).ok());
    // Unknown, or reserved but not committed: kNotFound.
    CHECK(store->demote(key(99)).code() == ErrorCode::kNotFound);
    auto open = store->reserve(key(100), 500, 1);
    REQUIRE(open.ok());
    CHECK(store->demote(key(100)).code() == ErrorCode::kNotFound);
    REQUIRE(store->abort(key(100), open->id).ok());
    // Now free to go.
    for (uint64_t i = 1; i < 4; ++i) REQUIRE(store->demote(key(i)).ok());
    CHECK(store->stats().entries == 1);
    CHECK(store->stats().ssd_entries == 3);
    for (uint64_t i = 0; i < 4; ++i) acquire_release(*store, key(i), kChunk);
    require_consistent(*store);
  }
}

TEST_CASE("demote: without an SSD tier kUnavailable; a tier that cannot take it leaves it in DRAM") {
  auto plain = make_store(64 * 1024);
  REQUIRE(put(*plain, key(1), 4000).ok());
  CHECK(plain->demote(key(1)).code() == ErrorCode::kUnavailable);
  CHECK(plain->demote(key(2)).code() == ErrorCode::kUnavailable);
  CHECK(plain->peek(key(1)).has_value());
  require_consistent(*plain);
  // A chunk larger than the whole tier: kOutOfMemory, the entry unchanged in DRAM.
  auto store = make_ssd_store(64 * 1024, ssd_modes().front(), 8192);
  REQUIRE(put(*store, key(1), 20000).ok());
  acquire_release(*store, key(1), 20000);
  const auto before = store->stats();
  Status st = store->demote(key(1));
  CHECK(st.code() == ErrorCode::kOutOfMemory);
  CHECK(tier_of(*store, key(1)) == Tier::kDram);
  CHECK(loads_of(*store, key(1)) == 1);
  const auto after = store->stats();
  CHECK(after.entries == before.entries);
  CHECK(after.evictions == before.evictions);
  CHECK(after.ssd_spill_failures == before.ssd_spill_failures);
  acquire_release(*store, key(1), 20000);
  require_consistent(*store);
}

// --- spills written without the store's mutex ---------------------------------------------------

namespace {

// Holds every SSD write of a store at its start while closed (SsdTierOptions::before_write), and
// fails them while `fail` is set: a slow disk and a dying one, deterministically.
struct WriteGate {
  std::mutex mu;
  std::condition_variable cv;
  bool closed = false;
  bool fail = false;
  int inside = 0;
  Status enter() {
    std::unique_lock lock(mu);
    ++inside;
    cv.notify_all();
    cv.wait(lock, [this] { return !closed; });
    --inside;
    return fail ? Status(ErrorCode::kInternal, "injected write failure") : Status::Ok();
  }
  void close() {
    std::lock_guard lock(mu);
    closed = true;
  }
  void open() {
    std::lock_guard lock(mu);
    closed = false;
    cv.notify_all();
  }
  void set_fail(bool f) {
    std::lock_guard lock(mu);
    fail = f;
  }
  void wait_inside(int n) {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return inside >= n; });
  }
};

std::unique_ptr<ChunkStore> make_gated_store(uint64_t capacity, WriteGate& gate, const SsdMode& mode = {},
                                             uint64_t ssd_capacity = 1 << 20) {
  SsdTierOptions o = ssd_file(mode, ssd_capacity);
  o.before_write = [&gate](uint64_t, uint64_t) { return gate.enter(); };
  return make_store(capacity, nullptr, 10s, 10s, std::move(o));
}

std::vector<Tier> tiers_of(ChunkStore& store, std::vector<ChunkKey> keys) {
  return store.lookup_tiers(keys);
}

}  // namespace

TEST_CASE("spill: other calls go on while a spill's write is held; acquire of the spilling key waits") {
  WriteGate gate;
  auto store = make_gated_store(4 * 4096, gate);
  for (uint64_t i = 0; i < 4; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  gate.close();
  Status spiller_put;
  std::thread spiller([&] { spiller_put = put(*store, key(10), 4000); });  // evicts and spills key 0
  gate.wait_inside(1);
  // The store's mutex is free: every call below would hang if the write held it.
  CHECK(tiers_of(*store, {key(0), key(1)}) == std::vector<Tier>{Tier::kSsd, Tier::kDram});
  CHECK(tier_of(*store, key(0)) == Tier::kSsd);
  auto s = store->stats();
  CHECK(s.spilling == 1);
  CHECK(s.bytes_spilling == 4096);
  CHECK(s.ssd_bytes_spilling == 4096);
  CHECK(s.entries == 3);
  CHECK(s.evictions == 0);  // counted when the spill lands
  require_consistent(*store);
  acquire_release(*store, key(1), 4000);
  REQUIRE(store->pin(key(2)).ok());
  REQUIRE(store->unpin(key(2)).ok());
  CHECK(store->reserve(key(0), 4000, 1).status().code() == ErrorCode::kAborted);
  CHECK(store->entries().size() == 4);
  CHECK(store->totals().entries == 4);
  // An acquire of the spilling key waits for the spill to land, then promotes it.
  std::atomic<bool> reader_done{false};
  Result<Lease> reader_lease = Status(ErrorCode::kInternal, "not run");
  std::thread reader([&] {
    reader_lease = store->acquire(key(0), 5);
    reader_done = true;
  });
  std::this_thread::sleep_for(50ms);
  CHECK_FALSE(reader_done.load());
  CHECK(tier_of(*store, key(0)) == Tier::kSsd);
  gate.open();
  spiller.join();
  reader.join();
  REQUIRE(spiller_put.ok());
  INFO(reader_lease.status().to_string());
  REQUIRE(reader_lease.ok());
  const auto expected = content(key(0), 4000);
  auto got = store->bytes(reader_lease.value());
  CHECK(std::equal(got.begin(), got.end(), expected.begin(), expected.end()));
  CHECK(store->verify(reader_lease.value()).ok());
  REQUIRE(store->release(reader_lease->id).ok());
  s = store->stats();
  CHECK(s.spilling == 0);
  CHECK(s.bytes_spilling == 0);
  CHECK(s.promotions == 1);
  CHECK(s.ssd_spills == 2);  // key 0, then what its promotion evicted
  require_consistent(*store);
}

TEST_CASE("spill: a clear during the write removes the entry when it lands") {
  WriteGate gate;
  auto store = make_gated_store(4 * 4096, gate);
  for (uint64_t i = 0; i < 4; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  gate.close();
  Status spiller_put;
  std::thread spiller([&] { spiller_put = put(*store, key(10), 4000); });
  gate.wait_inside(1);
  ChunkKey k0[] = {key(0)};
  const ClearResult r = store->clear(k0);
  CHECK(r.removed == 1);
  CHECK(store->clear(k0).removed == 0);  // marked once
  require_consistent(*store);
  gate.open();
  spiller.join();
  REQUIRE(spiller_put.ok());
  CHECK(store->lookup(k0) == 0);
  CHECK_FALSE(store->peek(key(0)).has_value());
  auto s = store->stats();
  CHECK(s.ssd_entries == 0);
  CHECK(s.ssd_cleared == 1);
  CHECK(s.evictions == 1);
  CHECK(store->acquire(key(0), 1).status().code() == ErrorCode::kNotFound);
  // clear_all during a spill likewise.
  gate.close();
  std::thread again([&] { spiller_put = put(*store, key(11), 4000); });
  gate.wait_inside(1);
  const ClearResult all = store->clear_all();
  CHECK(all.removed == 4);  // three DRAM entries and the spilling one
  gate.open();
  again.join();
  REQUIRE(spiller_put.ok());
  CHECK(store->totals().entries == 1);  // key 11, reserved after the clear
  CHECK(store->stats().ssd_entries == 0);
  require_consistent(*store);
}

TEST_CASE("spill: a failed write drops the evicted entry and frees its block; a demote's keeps it") {
  WriteGate gate;
  auto store = make_gated_store(4 * 4096, gate);
  for (uint64_t i = 0; i < 4; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  acquire_release(*store, key(1), 4000);
  gate.set_fail(true);
  REQUIRE(put(*store, key(10), 4000).ok());  // key 0 is dropped, its block reused
  CHECK_FALSE(stored(*store, key(0)));
  auto s = store->stats();
  CHECK(s.ssd_spill_failures == 1);
  CHECK(s.evictions == 1);
  CHECK(s.ssd_spills == 0);
  CHECK(s.ssd_bytes_used == 0);
  require_consistent(*store);
  Status st = store->demote(key(1));
  CHECK(st.code() == ErrorCode::kInternal);
  CHECK(st.message().find("stays in dram") != std::string::npos);
  CHECK(tier_of(*store, key(1)) == Tier::kDram);
  CHECK(loads_of(*store, key(1)) == 1);
  CHECK(store->stats().evictions == 1);
  CHECK(store->stats().ssd_bytes_used == 0);
  acquire_release(*store, key(1), 4000);
  require_consistent(*store);
  gate.set_fail(false);
  REQUIRE(store->demote(key(1)).ok());
  CHECK(tier_of(*store, key(1)) == Tier::kSsd);
  acquire_release(*store, key(1), 4000);
  require_consistent(*store);
}

TEST_CASE("spill: demote writes without the mutex too; a demote of a spilling key waits for it") {
  WriteGate gate;
  auto store = make_gated_store(8 * 4096, gate);
  for (uint64_t i = 0; i < 4; ++i) REQUIRE(put(*store, key(i), 4000).ok());
  gate.close();
  Status demoted;
  std::thread demoter([&] { demoted = store->demote(key(1)); });
  gate.wait_inside(1);
  CHECK(tiers_of(*store, {key(0), key(1)}) == std::vector<Tier>{Tier::kDram, Tier::kSsd});
  CHECK(store->stats().spilling == 1);
  require_consistent(*store);
  acquire_release(*store, key(0), 4000);
  std::atomic<bool> second_done{false};
  Status second;
  std::thread again([&] {
    second = store->demote(key(1));
    second_done = true;
  });
  std::this_thread::sleep_for(30ms);
  CHECK_FALSE(second_done.load());
  gate.open();
  demoter.join();
  again.join();
  CHECK(demoted.ok());
  CHECK(second.ok());  // in the SSD tier by then: nothing to do
  CHECK(store->stats().ssd_spills == 1);
  CHECK(tier_of(*store, key(1)) == Tier::kSsd);
  acquire_release(*store, key(1), 4000);
  require_consistent(*store);
}

TEST_CASE("spill: concurrent reserve, acquire, lookup, clear and demote while spills run; bytes verified") {
  for (const auto& mode : ssd_modes()) {
    INFO("ssd tier: " << mode.name());
    constexpr uint64_t kKeys = 120;
    auto size_of = [](uint64_t i) { return 3000 + (i * 7919) % 21000; };
    auto store = make_ssd_store(512 * 1024, mode, 16 << 20);
    std::atomic<bool> done{false};
    std::atomic<uint64_t> verified{0};
    std::atomic<uint64_t> failures{0};
    std::mutex first_mu;
    std::string first;
    auto fail = [&](const std::string& what) {
      if (failures.fetch_add(1) == 0) {
        std::lock_guard lock(first_mu);
        first = what;
      }
    };
    std::vector<std::thread> threads;
    for (int t = 0; t < 6; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(static_cast<uint64_t>(t) * 7 + 3);
        for (int n = 0; n < 1500; ++n) {
          const uint64_t i = rng() % kKeys;
          const ChunkKey k = key(i);
          const uint64_t bytes = size_of(i);
          const uint64_t op = rng() % 20;
          if (op < 7) {
            auto r = store->reserve(k, bytes, static_cast<ClientId>(t));
            if (!r.ok()) {
              if (r.status().code() != ErrorCode::kAborted) fail("reserve: " + r.status().to_string());
              continue;
            }
            const auto data = content(k, bytes);
            std::copy(data.begin(), data.end(), store->bytes(r.value()).begin());
            if (Status st = store->commit(k, r->id); !st.ok()) fail("commit: " + st.to_string());
          } else if (op < 14) {
            auto lease = store->acquire(k, static_cast<ClientId>(t));
            if (!lease.ok()) {
              if (lease.status().code() != ErrorCode::kNotFound)
                fail("acquire: " + lease.status().to_string());
              continue;
            }
            const auto expected = content(k, bytes);
            auto got = store->bytes(lease.value());
            if (!std::equal(got.begin(), got.end(), expected.begin(), expected.end())) fail("bytes differ");
            if (!store->verify(lease.value()).ok()) fail("verify");
            ++verified;
            if (Status st = store->release(lease->id); !st.ok()) fail("release: " + st.to_string());
          } else if (op < 16) {
            std::vector<ChunkKey> chain{k, key((i + 1) % kKeys), key((i + 2) % kKeys)};
            const auto tiers = store->lookup_tiers(chain);
            if (tiers.size() > chain.size()) fail("lookup_tiers");
            (void)store->lookup(chain);
          } else if (op < 17) {
            ChunkKey one[] = {k};
            (void)store->clear(one);
          } else if (op < 19) {
            Status st = store->demote(k);
            if (!st.ok() && st.code() != ErrorCode::kNotFound && st.code() != ErrorCode::kAborted)
              fail("demote: " + st.to_string());
          } else {
            (void)store->peek(k);
            if (n % 100 == 0) (void)store->entries();
          }
        }
      });
    }
    std::thread auditor([&] {
      while (!done.load()) {
        if (Status st = store->audit(); !st.ok()) fail("audit during the run: " + st.to_string());
        std::this_thread::sleep_for(1ms);
      }
    });
    for (auto& th : threads) th.join();
    done = true;
    auditor.join();
    INFO(first);
    CHECK(failures.load() == 0);
    CHECK(verified.load() > 1000);
    require_consistent(*store);
    auto s = store->stats();
    CHECK(s.spilling == 0);
    CHECK(s.promoting == 0);
    CHECK(s.ssd_spills > 100);
    CHECK(s.promotions > 100);
    CHECK(s.ssd_spill_failures == 0);
    CHECK(s.ssd_bytes_spilling == 0);
    // Whatever is still stored, in either tier, reads back intact.
    for (const auto& [k, info] : store->entries()) {
      uint64_t i = 0;
      while (i < kKeys && !(k == key(i))) ++i;
      REQUIRE(i < kKeys);
      acquire_release(*store, k, size_of(i));
    }
    require_consistent(*store);
  }
}
