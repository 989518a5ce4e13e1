// ChunkStore on one thread: put/commit/get with checksums, abort, expiry with an injected clock,
// LRU order, pins under pressure, out-of-memory, clear, drop_client, error paths, and stats that
// add up after every operation of a random sequence.
#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

#include "catch.h"
#include "kvf/store/chunk_store.h"

using namespace kvf;
using namespace kvf::store;
using protocol::ChunkKey;
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
                                       StoreClock::duration lease_timeout = 10s) {
  auto arena = gpudirect::MemoryRegion::allocate_host(nullptr, capacity);
  REQUIRE(arena.ok());
  ChunkStoreOptions options;
  options.alignment = 256;
  options.reservation_timeout = reservation_timeout;
  options.lease_timeout = lease_timeout;
  if (clock) options.clock = [clock] { return clock->now; };
  auto store = ChunkStore::create(std::move(arena.value()), std::move(options));
  REQUIRE(store.ok());
  return std::move(store.value());
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

TEST_CASE("stats add up after every operation of a random sequence") {
  ManualClock clock;
  auto store = make_store(32 * 1024, &clock, 3s, 3s);
  std::mt19937_64 rng(2024);
  std::vector<Reservation> open;
  std::vector<uint64_t> leases;
  for (int step = 0; step < 4000; ++step) {
    auto k = key(rng() % 64);
    switch (rng() % 10) {
      case 0:
      case 1: {
        auto r = store->reserve(k, 1 + rng() % 4000, rng() % 3, ChunkKey{0, k.lo % 3});  // 3 models
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
        if (l.ok()) leases.push_back(l->id);
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
          // None of that model's committed entries is left.
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
}
