// ChunkStore: the node's prefix store core. An index ChunkKey -> entry over one arena (a
// MemoryRegion: POSIX shared memory that engine processes map, so they write and read chunks in
// place with no copy through the daemon; or plain host memory in tests and in-process use).
//
//   put: reserve(key, bytes, writer, model) -> Reservation {offset, length}; the writer fills
//        arena[offset, +length) (memcpy or DMA) -> commit(key, id) hashes the bytes (XXH3-64) and
//        makes the entry visible; abort(key, id) gives the space back. A reservation that is not
//        committed within reservation_timeout (its writer died) is freed by reap_expired().
//        `model` is the fingerprint the key was hashed with (ChunkHasher::model()); the entry keeps
//        it so that clear_model() can remove one model's chunks (a key alone does not tell).
//   get: lookup(keys) -> the length of the stored prefix of a key chain (no lease, no LRU touch);
//        acquire(key, reader) -> Lease {offset, length, checksum}: until release(lease id) the
//        entry is neither evicted nor cleared nor its bytes reused. Leases also expire after
//        lease_timeout (the reader died); a reader that overran it learns so from release().
//   space: when the arena is full, reserve evicts entries in the policy's order (LRU by default);
//        pinned, leased and reserved entries are never evicted. When nothing evictable is left,
//        reserve fails with kOutOfMemory saying what holds the space.
// Entries are immutable once committed (a key is a content address): reserving a key that is
// stored or being stored fails with kAborted, which a writer treats as "nothing to do".
// Thread rules: every method may be called from any thread at once; one mutex guards the index
// and is never held while chunk bytes are hashed. Bytes in the arena are the callers' to
// synchronize: a writer owns its reservation's range until commit/abort, readers share a leased
// range read-only.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "kvf/gpudirect/memory_region.h"
#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/status.h"
#include "kvf/store/eviction_policy.h"
#include "kvf/store/store_stats.h"

namespace kvf::store {

using StoreClock = std::chrono::steady_clock;
using ClientId = uint64_t;  // an engine connection (writer or reader); drop_client frees its holds

// The checksum kept with every chunk: XXH3-64, no seed, so any process can verify bytes it reads.
uint64_t chunk_checksum(const uint8_t* data, uint64_t length);

struct ChunkStoreOptions {
  uint64_t alignment = 256;  // arena offsets and lengths; a power of two
  StoreClock::duration reservation_timeout = std::chrono::seconds(30);
  StoreClock::duration lease_timeout = std::chrono::seconds(30);
  // Time source for deadlines; empty means StoreClock::now. Tests inject a manual clock.
  std::function<StoreClock::time_point()> clock;
  std::unique_ptr<EvictionPolicy> policy;  // null means LRU
};

struct Reservation {
  protocol::ChunkKey key;
  uint64_t id = 0;      // unique per reservation: a late commit after expiry cannot hit a newer one
  uint64_t offset = 0;  // into the arena
  uint64_t length = 0;  // the bytes the writer asked for
};

struct Lease {
  uint64_t id = 0;
  protocol::ChunkKey key;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t checksum = 0;     // chunk_checksum of the committed bytes
  protocol::ChunkKey model;  // the fingerprint the entry was stored under (zero: none recorded)
};

// A committed entry as peek() sees it.
struct EntryInfo {
  uint64_t bytes = 0;  // the chunk's length
  protocol::ChunkKey model;
  uint32_t pins = 0;
  uint32_t leases = 0;
};

struct EntryTotals {
  uint64_t entries = 0;  // committed, visible
  uint64_t bytes = 0;    // their chunk lengths (not the aligned arena blocks)
};

struct ClearResult {
  uint64_t removed = 0;   // entries that left the index
  uint64_t deferred = 0;  // of those, entries whose bytes stay until their leases are released
  uint64_t bytes = 0;     // arena bytes of the removed entries (freed now, or on the last release)
};

struct ReapResult {
  uint64_t reservations = 0;
  uint64_t leases = 0;
};

class ChunkStore {
 public:
  // Takes the arena (its size is the store's capacity, rounded down to the alignment).
  static Result<std::unique_ptr<ChunkStore>> create(gpudirect::MemoryRegion arena,
                                                    ChunkStoreOptions options = {});
  ~ChunkStore();
  ChunkStore(const ChunkStore&) = delete;
  ChunkStore& operator=(const ChunkStore&) = delete;

  const gpudirect::MemoryRegion& arena() const;
  // In-process access to a reservation's or a lease's bytes.
  std::span<uint8_t> bytes(const Reservation& r) const;
  std::span<const uint8_t> bytes(const Lease& l) const;

  // `model`: the model fingerprint `key` was hashed with; an entry reserved without one (zero) is
  // cleared by clear_model() only when it is asked for the zero fingerprint.
  // Errors: kInvalidArgument (zero bytes; more than the arena can ever hold), kAborted (the key is
  // stored or being stored), kOutOfMemory (full of pinned, leased and reserved entries).
  Result<Reservation> reserve(const protocol::ChunkKey& key, uint64_t bytes, ClientId writer,
                              const protocol::ChunkKey& model = {});
  // With `expected_checksum` (bytes that came from elsewhere, e.g. another node) the one hash
  // commit makes is also the check: a mismatch is kVerifyFailed and the entry stays reserved.
  // Errors: kNotFound (no such reservation: aborted, expired, dropped, or never made),
  // kInvalidArgument (already committed, or a commit of it is in progress).
  Status commit(const protocol::ChunkKey& key, uint64_t reservation_id,
                std::optional<uint64_t> expected_checksum = std::nullopt);
  Status abort(const protocol::ChunkKey& key, uint64_t reservation_id);

  // How many leading keys of the chain are stored and committed; stops at the first miss. Takes
  // no lease and is a peek: it does not count as use for eviction, because routers probe every
  // node for a prompt and only the node that then serves it (acquire) should keep it warm.
  size_t lookup(std::span<const protocol::ChunkKey> keys);
  // A committed entry's length, model and holds; nullopt when not stored. Counts nothing (no hit,
  // no miss, no use for eviction): for the control API's bookkeeping, not for readers.
  std::optional<EntryInfo> peek(const protocol::ChunkKey& key) const;
  // Committed, visible entries and their chunk bytes, in one pass.
  EntryTotals totals() const;
  // Errors: kNotFound (not stored or not yet committed).
  Result<Lease> acquire(const protocol::ChunkKey& key, ClientId reader);
  // Errors: kNotFound (unknown lease, already released, or expired: the bytes may have changed).
  Status release(uint64_t lease_id);
  // Recomputes the checksum of a leased range. kVerifyFailed when it differs.
  Status verify(const Lease& lease) const;

  // Pins are counted: an entry stays unevictable until unpinned as often as pinned.
  // Errors: kNotFound (not stored), kInvalidArgument (unpin of an entry that is not pinned).
  Status pin(const protocol::ChunkKey& key);
  Status unpin(const protocol::ChunkKey& key);

  // Removes committed entries, pinned ones too (an explicit clear beats a pin); leased entries
  // leave the index at once and free their bytes on their last release. Reservations in progress
  // are not touched. Unknown keys are skipped.
  ClearResult clear_all();
  ClearResult clear(std::span<const protocol::ChunkKey> keys);
  // The committed entries reserved under `model` (O(entries): it walks the index).
  ClearResult clear_model(const protocol::ChunkKey& model);

  // Frees reservations and leases whose deadline is at or before `now`. The daemon calls it
  // periodically; reserve also calls it before failing with kOutOfMemory.
  ReapResult reap_expired(StoreClock::time_point now);
  // Frees every reservation (except one being committed) and lease held by `client`, at once:
  // for a connection the daemon saw close.
  ReapResult drop_client(ClientId client);

  StoreStats stats() const;
  // Walks the index, the leases, the allocator and the policy and checks they agree with each
  // other and with stats() (O(entries), for tests and debugging). kInternal on a mismatch.
  Status audit() const;

 private:
  struct Impl;
  explicit ChunkStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::store
