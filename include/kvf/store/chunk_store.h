// ChunkStore: the node's prefix store core. An index ChunkKey -> entry over one arena (a
// MemoryRegion: POSIX shared memory that engine processes map, so they write and read chunks in
// place with no copy through the daemon; or plain host memory in tests and in-process use), and
// optionally an SSD tier under it (ssd_tier.h) that catches what the arena evicts.
//
//   put: reserve(key, bytes, writer, model, codec) -> Reservation {offset, length}; the writer fills
//        arena[offset, +length) (memcpy or DMA) -> commit(key, id) hashes the bytes (chunk_checksum.h) and
//        makes the entry visible; abort(key, id) gives the space back. A reservation that is not
//        committed within reservation_timeout (its writer died) is freed by reap_expired().
//        `model` is the fingerprint the key was hashed with (ChunkHasher::model()); the entry keeps
//        it so that clear_model() can remove one model's chunks (a key alone does not tell).
//        `codec` says how the bytes are encoded (protocol/kv_codec.h; identity: raw KV); the store
//        never looks inside, it keeps the byte with the entry and reports it with every lease.
//   get: lookup(keys) -> the length of the stored prefix of a key chain (no lease, no LRU touch);
//        lookup_tiers(keys) also says which tier each matched key is in.
//        acquire(key, reader) -> Lease {offset, length, checksum, model, codec}: until release(lease
//        id) the entry is neither evicted nor cleared nor its bytes reused. Leases also expire after
//        lease_timeout (the reader died); a reader that overran it learns so from release().
//   space: when the arena is full, reserve evicts entries in the policy's order (LRU by default);
//        pinned, leased, reserved and re-encoding entries are never evicted. When nothing evictable
//        is left (and no other caller's spill is about to free a block), reserve fails with
//        kOutOfMemory saying what holds the space.
//   re-encode (the control API's /compress): reserve_replacement(key, bytes, codec, writer) gives a
//        Reservation for new bytes of a committed entry; commit_replacement(key, id) hashes them and
//        swaps the entry's bytes, checksum and codec in one step (readers holding leases keep the
//        old bytes until they release them; pins stay); abort(key, id) drops them.
// SSD tier (ChunkStoreOptions::ssd; without it everything above is all there is):
//   spill:   an entry that reserve evicts from the arena is written to the tier with its checksum,
//            model, codec and loads (one eviction from DRAM, one spill); a full tier evicts its own
//            least recently spilled entries. An entry the tier cannot take (I/O error, no extent
//            free) is dropped, as without a tier, and counted in ssd_spill_failures. Only evictable
//            entries are ever spilled: pinned, leased, reserved and re-encoding ones stay in DRAM.
//            The write runs without the store's mutex, in three steps: under the mutex the victim
//            leaves the visible DRAM entries for a "spilling" state that keeps its arena block
//            allocated (no one can be given it) and an SSD extent is reserved for it; the caller
//            that evicted it writes the bytes with the mutex released; under the mutex again the
//            entry enters the SSD index and its block is freed (evictions and ssd_spills count it
//            then; spilling, bytes_spilling and ssd_bytes_spilling count it meanwhile). A reserve
//            (or promotion) that needs space begins as many spills as the missing bytes take,
//            writes them, lands them and looks again (fragmentation may take another round); with
//            nothing left to evict it waits for other callers' spills before it gives up. Meanwhile
//            a spilling key counts as in the SSD tier (lookup, lookup_tiers, peek, entries,
//            totals), is stored to reserve (kAborted), and acquire, pin, reserve_replacement,
//            unpin and demote of it wait for its spill to land (then acquire promotes it back: the
//            simplest correct answer; a key evicted and wanted at once is written and read). A
//            clear during the write removes the entry when it lands; a failed write drops it and
//            frees its block. Without an SSD tier eviction drops victims under the mutex as before.
//            perf/store_bench_main.cpp --ssd-path measures the evicting reserve itself (which still
//            waits for its own spills: it needs their blocks).
//   tiers:   every key is in at most one tier. lookup counts a chain across both tiers;
//            reserving a key the SSD holds is kAborted like one the arena holds.
//   promote: acquire (and pin, and reserve_replacement) of an entry in the SSD tier moves it into
//            the arena: take the entry out of the SSD index (into a promoting DRAM entry without a
//            block yet), reserve a block (evicting and spilling others as needed, their writes
//            without the mutex), then, without the mutex, read its bytes and check them against
//            its checksum; then commit it to DRAM and go on as with any DRAM entry. The entry
//            leaves the SSD tier (it is in one tier at a time: a copy in both would spend SSD space
//            on what DRAM holds, and an entry evicted again is written again). A mismatch drops it
//            (kVerifyFailed); a read error likewise (kInternal). Other callers of the same key wait
//            for the promotion; lookups count it as in the SSD until it is done; a clear during it
//            removes the entry when it lands.
//   pins:    a pin of an SSD entry promotes it and pins it in DRAM (a pin means "keep it fast");
//            unpin of an SSD entry is kInvalidArgument (not pinned), as for any unpinned entry.
//   demote:  demote(key) spills one committed, unheld DRAM entry now, as eviction would and on the
//            same path (the write without the mutex); unlike eviction, an entry the tier cannot
//            take (no extent, a failed write) is a visible DRAM entry again, unchanged. Counted as an
//            eviction and a spill (evictions, ssd_spills): no stats field of its own.
// Reuse: every entry counts its loads (EntryInfo::loads: successful acquires since it was first
// committed, the one that promoted it included); the count moves with the entry between the tiers
// and survives commit_replacement. peek() and entries() report it; nothing else reads it.
// Entries are immutable once committed except through commit_replacement (a key is a content
// address): reserving a key that is stored or being stored fails with kAborted, which a writer
// treats as "nothing to do".
// Thread rules: every method may be called from any thread at once; one mutex guards the index,
// the allocator and the SSD tier's index, and is never held while chunk bytes are hashed, read
// from the SSD or written to it (spills and demotions write with it released; above). Bytes in the
// arena are the callers' to synchronize: a writer owns its reservation's range until commit/abort,
// readers share a leased range read-only. Calls that evict, promote or demote may block on SSD
// I/O themselves (their own, or a spill or promotion of the same key they wait for), but no
// other call waits for it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kvf/gpudirect/memory_region.h"
#include "kvf/protocol/chunk_key.h"
#include "kvf/protocol/kv_codec.h"
#include "kvf/protocol/status.h"
#include "kvf/protocol/tier.h"
#include "kvf/store/chunk_checksum.h"
#include "kvf/store/eviction_policy.h"
#include "kvf/store/ssd_tier.h"
#include "kvf/store/store_stats.h"

namespace kvf::store {

using StoreClock = std::chrono::steady_clock;
using ClientId = uint64_t;  // an engine connection (writer or reader); drop_client frees its holds

struct ChunkStoreOptions {
  uint64_t alignment = 256;  // arena offsets and lengths; a power of two
  StoreClock::duration reservation_timeout = std::chrono::seconds(30);
  StoreClock::duration lease_timeout = std::chrono::seconds(30);
  // Time source for deadlines; empty means StoreClock::now. Tests inject a manual clock.
  std::function<StoreClock::time_point()> clock;
  std::unique_ptr<EvictionPolicy> policy;  // null means LRU
  // The SSD tier under the arena: unset, none (evicted entries are dropped).
  std::optional<SsdTierOptions> ssd;
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
  protocol::KvCodec codec = protocol::KvCodec::kIdentity;  // how the bytes are encoded
};

// A committed entry as peek() and entries() see it.
struct EntryInfo {
  uint64_t bytes = 0;  // the chunk's length
  protocol::ChunkKey model;
  uint32_t pins = 0;  // 0 in the SSD tier (pinned entries are in DRAM)
  uint32_t leases = 0;
  protocol::Tier tier = protocol::Tier::kDram;  // kSsd: in the SSD tier, or being promoted from it
  protocol::KvCodec codec = protocol::KvCodec::kIdentity;
  uint64_t loads = 0;  // successful acquires since first committed (kept across tiers and re-encodes)
};

struct EntryTotals {
  uint64_t entries = 0;  // committed, visible, in either tier
  uint64_t bytes = 0;    // their chunk lengths (not the aligned arena blocks)
};

struct ClearResult {
  uint64_t removed = 0;   // entries that left the index (either tier)
  uint64_t deferred = 0;  // of those, entries whose bytes stay until their leases are released
  uint64_t bytes = 0;     // arena bytes of the removed entries (freed now, or on the last release)
                          // and SSD extent bytes of the removed SSD entries (those being promoted
                          // or spilled count as SSD entries)
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
  // `codec`: how the writer encoded the bytes; kept with the entry, reported by leases and peek.
  // Errors: kInvalidArgument (zero bytes; more than the arena can ever hold), kAborted (the key is
  // stored, in either tier, or being stored), kOutOfMemory (full of pinned, leased and reserved
  // entries).
  Result<Reservation> reserve(const protocol::ChunkKey& key, uint64_t bytes, ClientId writer,
                              const protocol::ChunkKey& model = {},
                              protocol::KvCodec codec = protocol::KvCodec::kIdentity);
  // With `expected_checksum` (bytes that came from elsewhere, e.g. another node) the one hash
  // commit makes is also the check: a mismatch is kVerifyFailed and the entry stays reserved.
  // Errors: kNotFound (no such reservation: aborted, expired, dropped, or never made),
  // kInvalidArgument (already committed, or a commit of it is in progress).
  Status commit(const protocol::ChunkKey& key, uint64_t reservation_id,
                std::optional<uint64_t> expected_checksum = std::nullopt);
  // Also ends a replacement reservation (reserve_replacement) of that id.
  Status abort(const protocol::ChunkKey& key, uint64_t reservation_id);

  // Re-encoding a committed entry in place of its bytes (for /compress): a reservation of `bytes`
  // for the entry's new encoding, written like any reservation. The entry stays readable and
  // unchanged meanwhile, and is not evicted (it counts as protected). An entry in the SSD tier is
  // promoted first. Errors: kInvalidArgument (zero bytes, or more than the arena holds), kNotFound
  // (not stored or not committed), kAborted (another replacement of it is being written),
  // kOutOfMemory, and a promotion's errors.
  Result<Reservation> reserve_replacement(const protocol::ChunkKey& key, uint64_t bytes,
                                          protocol::KvCodec codec, ClientId writer);
  // Hashes the replacement (without the mutex) and, in one step under it, makes it the entry's
  // bytes, checksum and codec. Leases granted before keep reading the old bytes, which are freed
  // on their last release; pins stay; the entry then counts as just used for eviction (like one
  // whose last lease ended). With `expected_checksum`, a mismatch is kVerifyFailed and the
  // replacement stays reserved. Errors: kNotFound (no such replacement; or the entry was cleared
  // meanwhile: the replacement is dropped), kInvalidArgument (a commit of it is in progress).
  Status commit_replacement(const protocol::ChunkKey& key, uint64_t reservation_id,
                            std::optional<uint64_t> expected_checksum = std::nullopt);

  // How many leading keys of the chain are stored and committed; stops at the first miss. Takes
  // no lease and is a peek: it does not count as use for eviction, because routers probe every
  // node for a prompt and only the node that then serves it (acquire) should keep it warm.
  // Counts each matched key as a hit of its tier (hits, ssd_hits) and a chain that stops as one
  // miss (and, with an SSD tier, one ssd_miss).
  size_t lookup(std::span<const protocol::ChunkKey> keys);
  // lookup, and the tier of each matched key (the result's size is lookup's count). An entry
  // being promoted or spilled counts as kSsd.
  std::vector<protocol::Tier> lookup_tiers(std::span<const protocol::ChunkKey> keys);
  // A committed entry's length, model, holds, tier and codec; nullopt when not stored. Counts
  // nothing (no hit, no miss, no use for eviction): for the control API's bookkeeping, not for
  // readers.
  std::optional<EntryInfo> peek(const protocol::ChunkKey& key) const;
  // Committed, visible entries and their chunk bytes, in one pass.
  EntryTotals totals() const;
  // The keys of every committed entry, in either tier (a snapshot; O(entries)).
  std::vector<protocol::ChunkKey> keys() const;
  // Every committed, visible entry of either tier with what peek() would say of it (a snapshot
  // taken in one pass under the mutex; O(entries); in no particular order). Counts nothing.
  std::vector<std::pair<protocol::ChunkKey, EntryInfo>> entries() const;
  // An entry in the SSD tier is promoted into the arena first (see above).
  // Errors: kNotFound (not stored or not yet committed); from a promotion: kOutOfMemory (no
  // arena space can be freed), kVerifyFailed (the SSD copy did not match its checksum: dropped),
  // kInternal (the SSD read failed: dropped).
  Result<Lease> acquire(const protocol::ChunkKey& key, ClientId reader);
  // Errors: kNotFound (unknown lease, already released, or expired: the bytes may have changed).
  Status release(uint64_t lease_id);
  // Recomputes the checksum of a leased range. kVerifyFailed when it differs.
  Status verify(const Lease& lease) const;

  // Pins are counted: an entry stays unevictable until unpinned as often as pinned. Pinning an
  // entry in the SSD tier promotes it (with acquire's errors).
  // Errors: kNotFound (not stored), kInvalidArgument (unpin of an entry that is not pinned).
  Status pin(const protocol::ChunkKey& key);
  Status unpin(const protocol::ChunkKey& key);

  // Moves a committed DRAM entry into the SSD tier now, as eviction would spill it (its bytes
  // written with its checksum, model, codec and loads, without the mutex; its arena block freed),
  // for a placement policy that decided it is not worth DRAM. Ok, doing nothing, when it is in the
  // SSD tier already (after waiting for a spill of it in progress). Counted as an eviction and a
  // spill. Errors: kUnavailable (no SSD tier), kNotFound
  // (not stored, or not committed yet), kAborted (pinned, leased, being re-encoded or being
  // promoted: it stays where it is; the message says which), kOutOfMemory (the tier has no extent
  // for it: larger than the tier, or its space is held by entries being read back) and kInternal
  // (the write failed): the entry then stays in DRAM unchanged (eviction would drop it).
  Status demote(const protocol::ChunkKey& key);

  // Removes committed entries of both tiers, pinned ones too (an explicit clear beats a pin);
  // leased entries leave the index at once and free their bytes on their last release; entries
  // being promoted or spilled are removed when their read or write lands. Reservations in progress are not
  // touched (a cleared entry's replacement is dropped). Unknown keys are skipped.
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
  // The SSD tier, for its path and I/O mode; null without one. Its index belongs to the store:
  // call only its constant accessors (path, capacity, direct, io_name).
  const SsdTier* ssd_tier() const;
  // Walks the index, the leases, the allocator and the policy and checks they agree with each
  // other and with stats() (O(entries), for tests and debugging). kInternal on a mismatch.
  Status audit() const;

 private:
  struct Impl;
  explicit ChunkStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvf::store
