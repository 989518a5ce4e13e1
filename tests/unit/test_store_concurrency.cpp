// ChunkStore under concurrent writers, readers and an operator thread, on a workload three times
// the arena: every read is checked against the checksum of content derived from its key, before
// and after holding the lease (a leased entry must never be overwritten), pinned entries must
// stay, and stats snapshots must add up at any moment. Catch2 assertions are not thread-safe:
// threads count failures in atomics and the test checks them after the join.
#include <array>
#include <atomic>
#include <chrono>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "catch.h"
#include "kvf/store/chunk_store.h"

using namespace kvf;
using namespace kvf::store;
using protocol::ChunkKey;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kArenaBytes = 2 << 20;
constexpr size_t kKeys = 180;  // about 3x the arena at a mean chunk of 36 KiB
constexpr size_t kPinned = 4;

struct Chunk {
  ChunkKey key;
  std::vector<uint8_t> bytes;
  uint64_t checksum = 0;
};

std::vector<Chunk> make_chunks() {
  std::vector<Chunk> chunks(kKeys);
  std::mt19937_64 rng(99);
  for (size_t i = 0; i < kKeys; ++i) {
    chunks[i].key = ChunkKey{0xc0ffee00 + i, rng()};
    chunks[i].bytes.resize(8192 + rng() % (56 * 1024));
    uint64_t x = chunks[i].key.lo | 1;
    for (auto& b : chunks[i].bytes) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      b = static_cast<uint8_t>(x);
    }
    chunks[i].checksum = chunk_checksum(chunks[i].bytes.data(), chunks[i].bytes.size());
  }
  return chunks;
}

// The first failure message of any thread, for the report after the join.
struct Failures {
  std::atomic<uint64_t> count{0};
  std::mutex mu;
  std::string first;
  void add(const std::string& what) {
    if (count.fetch_add(1) == 0) {
      std::lock_guard lock(mu);
      first = what;
    }
  }
};

}  // namespace

TEST_CASE(
    "concurrent writers and readers on 3x the arena: leased bytes never change, pins stay, stats add up") {
  const auto chunks = make_chunks();
  auto arena = gpudirect::MemoryRegion::allocate_host(nullptr, kArenaBytes);
  REQUIRE(arena.ok());
  auto created = ChunkStore::create(std::move(arena.value()));
  REQUIRE(created.ok());
  ChunkStore& store = *created.value();

  for (size_t i = 0; i < kPinned; ++i) {
    auto r = store.reserve(chunks[i].key, chunks[i].bytes.size(), 100);
    REQUIRE(r.ok());
    std::copy(chunks[i].bytes.begin(), chunks[i].bytes.end(), store.bytes(r.value()).begin());
    REQUIRE(store.commit(chunks[i].key, r->id).ok());
    REQUIRE(store.pin(chunks[i].key).ok());
  }

  Failures failures;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0}, writes{0}, full{0}, lookups{0};

  auto writer = [&](ClientId id) {
    std::mt19937_64 rng(id);
    while (!stop.load(std::memory_order_relaxed)) {
      const Chunk& c = chunks[kPinned + rng() % (kKeys - kPinned)];
      auto r = store.reserve(c.key, c.bytes.size(), id);
      if (!r.ok()) {
        if (r.status().code() == ErrorCode::kOutOfMemory) {
          full.fetch_add(1);
        } else if (r.status().code() != ErrorCode::kAborted) {
          failures.add("reserve: " + r.status().to_string());
        }
        continue;
      }
      if (r->length != c.bytes.size()) failures.add("reservation length");
      std::copy(c.bytes.begin(), c.bytes.end(), store.bytes(r.value()).begin());
      Status s = rng() % 10 == 0 ? store.abort(c.key, r->id) : store.commit(c.key, r->id);
      if (!s.ok()) failures.add("commit/abort: " + s.to_string());
      writes.fetch_add(1);
    }
  };

  auto reader = [&](ClientId id) {
    std::mt19937_64 rng(id);
    while (!stop.load(std::memory_order_relaxed)) {
      size_t i = rng() % kKeys;
      const Chunk& c = chunks[i];
      auto lease = store.acquire(c.key, id);
      if (!lease.ok()) {
        if (lease.status().code() != ErrorCode::kNotFound)
          failures.add("acquire: " + lease.status().to_string());
        if (i < kPinned) failures.add("pinned chunk " + std::to_string(i) + " is gone");
        continue;
      }
      if (lease->length != c.bytes.size() || lease->checksum != c.checksum) {
        failures.add("lease of chunk " + std::to_string(i) + " has the wrong length or checksum");
      }
      auto bytes = store.bytes(lease.value());
      if (chunk_checksum(bytes.data(), bytes.size()) != c.checksum) {
        failures.add("chunk " + std::to_string(i) + " read wrong bytes");
      }
      // Hold the lease a little while writers churn, then check nobody wrote into it.
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
      if (store.verify(lease.value()).code() != ErrorCode::kOk) {
        failures.add("chunk " + std::to_string(i) + " changed while leased");
      }
      if (!store.release(lease->id).ok()) failures.add("release failed");
      reads.fetch_add(1);
      // A prefix lookup over a chain of neighbours, without a lease.
      std::array<ChunkKey, 8> chain;
      for (size_t k = 0; k < chain.size(); ++k) chain[k] = chunks[(i + k) % kKeys].key;
      if (store.lookup(chain) > chain.size()) failures.add("lookup matched more keys than asked");
      lookups.fetch_add(1);
    }
  };

  auto operator_thread = [&] {
    std::mt19937_64 rng(7);
    while (!stop.load(std::memory_order_relaxed)) {
      Status s = check_stats_invariants(store.stats());
      if (!s.ok()) failures.add(s.to_string());
      const Chunk& c = chunks[kPinned + rng() % (kKeys - kPinned)];
      if (store.pin(c.key).ok()) {
        std::this_thread::sleep_for(100us);
        if (!store.unpin(c.key).ok()) failures.add("unpin of a pinned chunk failed");
      }
      if (rng() % 50 == 0) {
        ChunkKey one[] = {chunks[kPinned + rng() % (kKeys - kPinned)].key};
        (void)store.clear(one);
      }
      std::this_thread::sleep_for(200us);
    }
  };

  std::vector<std::thread> threads;
  threads.emplace_back(writer, 1);
  threads.emplace_back(writer, 2);
  threads.emplace_back(reader, 11);
  threads.emplace_back(reader, 12);
  threads.emplace_back(operator_thread);
  std::this_thread::sleep_for(1500ms);
  stop = true;
  for (auto& t : threads) t.join();

  INFO("first failure: " << failures.first);
  REQUIRE(failures.count.load() == 0);
  auto s = store.stats();
  INFO("reads " << reads.load() << ", writes " << writes.load() << ", lookups " << lookups.load() << ", full "
                << full.load() << ", evictions " << s.evictions << ", inserts " << s.inserts);
  REQUIRE(reads.load() > 100);
  REQUIRE(writes.load() > 100);
  REQUIRE(s.evictions > 0);
  REQUIRE(s.inserts > kKeys);  // the key space went round more than once
  REQUIRE(s.active_leases == 0);
  REQUIRE(s.reservations == 0);
  REQUIRE(s.pinned == kPinned);
  for (size_t i = 0; i < kPinned; ++i) {
    auto lease = store.acquire(chunks[i].key, 1);
    REQUIRE(lease.ok());
    REQUIRE(store.verify(lease.value()).ok());
    REQUIRE(lease->checksum == chunks[i].checksum);
    REQUIRE(store.release(lease->id).ok());
  }
  Status audit = store.audit();
  INFO(audit.to_string());
  REQUIRE(audit.ok());
}
