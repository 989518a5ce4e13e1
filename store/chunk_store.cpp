#include "kvf/store/chunk_store.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "kvf/store/arena_allocator.h"

namespace kvf::store {

using protocol::ChunkKey;
using protocol::KvCodec;
using protocol::Tier;

namespace {

// kPromoting: an entry coming from the SSD tier (promote_locked): first without a block while
// space is made, then its block being filled; no reservation id, no writer, no holds until it is
// committed. kSpilling: an entry evicted or demoted whose bytes are being written to the SSD tier
// (its block stays allocated until they are); no holds.
enum class EntryState : uint8_t { kReserved, kCommitting, kCommitted, kPromoting, kSpilling };

struct Entry {
  ArenaBlock block;    // what the allocator gave (aligned length); none yet for a promotion making room
  ArenaBlock extent;   // the SSD tier's extent while promoting or spilling
  uint64_t bytes = 0;  // what the writer asked for; the chunk's length
  uint64_t checksum = 0;
  ChunkKey model;  // the fingerprint the key was hashed with, as the writer said
  KvCodec codec = KvCodec::kIdentity;
  uint64_t reservation_id = 0;
  uint64_t replacement_id = 0;  // a replacement (re-encode) being written for this entry
  ClientId writer = 0;
  StoreClock::time_point deadline{};  // reservations only
  uint32_t pins = 0;
  uint32_t leases = 0;
  uint64_t loads = 0;  // successful acquires since first committed (EntryInfo::loads)
  EntryState state = EntryState::kReserved;
  bool detached = false;           // cleared while leased: out of the index, bytes kept for the readers
  bool cleared_in_flight = false;  // promoting or spilling: removed when its I/O lands
};

// New bytes for a committed entry (reserve_replacement); kept apart from the entry so that a
// clear of the entry while the replacement is hashed cannot free the block under the hash.
struct Replacement {
  ChunkKey key;
  ArenaBlock block;
  uint64_t bytes = 0;
  KvCodec codec = KvCodec::kIdentity;
  ClientId writer = 0;
  StoreClock::time_point deadline{};
  bool committing = false;  // skipped by reaping, aborts, clears and drop_client
};

struct LeaseRecord {
  ChunkKey key;
  // Node-based maps keep element addresses stable across rehashing and across extract/insert
  // from the index into the detached map, so a lease can point at its entry.
  Entry* entry = nullptr;
  ClientId reader = 0;
  StoreClock::time_point deadline{};
};

std::string hex(const ChunkKey& key) {
  return key.to_hex();
}

// What peek() and entries() say of a committed, promoting or spilling DRAM entry (the last two
// count as in the SSD tier), and of an SSD entry.
bool listed(const Entry& e) {
  return e.state == EntryState::kCommitted || e.state == EntryState::kPromoting ||
         e.state == EntryState::kSpilling;
}
EntryInfo info_of(const Entry& e) {
  if (e.state != EntryState::kCommitted)
    return EntryInfo{e.bytes, e.model, 0, 0, Tier::kSsd, e.codec, e.loads};
  return EntryInfo{e.bytes, e.model, e.pins, e.leases, Tier::kDram, e.codec, e.loads};
}
EntryInfo info_of(const SsdEntry& e) {
  return EntryInfo{e.bytes, e.model, 0, 0, Tier::kSsd, e.codec, e.loads};
}

}  // namespace

struct ChunkStore::Impl {
  using IndexIt = std::unordered_map<ChunkKey, Entry>::iterator;

  Impl(gpudirect::MemoryRegion region, ArenaAllocator alloc, ChunkStoreOptions opts,
       std::unique_ptr<SsdTier> tier)
      : arena(std::move(region)),
        allocator(std::move(alloc)),
        options(std::move(opts)),
        ssd(std::move(tier)) {
    policy = options.policy ? std::move(options.policy) : make_lru_policy();
  }

  StoreClock::time_point now() const { return options.clock ? options.clock() : StoreClock::now(); }

  static bool is_protected(const Entry& e) { return e.pins > 0 || e.leases > 0 || e.replacement_id != 0; }

  // A visible entry stopped being evictable.
  void protect(const ChunkKey& key) {
    ++s.protected_entries;
    --s.evictable;
    policy->on_remove(key);
  }
  // A visible entry became evictable again; it counts as just used.
  void unprotect(const ChunkKey& key) {
    --s.protected_entries;
    ++s.evictable;
    policy->on_insert(key);
  }

  void free_block(const ArenaBlock& block) {
    // Every block here came from this allocator and is freed once; a refusal would be a store bug,
    // and leaking the block is safer than corrupting the free list. audit() then reports it.
    if (Status st = allocator.free(block); !st.ok()) spdlog::error("chunk store: {}", st.to_string());
  }

  enum class ReservationEnd { kAborted, kExpired, kDropped };
  void count_end(ReservationEnd why) {
    switch (why) {
      case ReservationEnd::kAborted:
        ++s.aborts;
        break;
      case ReservationEnd::kExpired:
        ++s.expired_reservations;
        break;
      case ReservationEnd::kDropped:
        ++s.dropped_reservations;
        break;
    }
  }

  // Frees a replacement's block and forgets it; does not touch its entry.
  void drop_replacement(std::unordered_map<uint64_t, Replacement>::iterator r, ReservationEnd why) {
    free_block(r->second.block);
    --s.reservations;
    s.bytes_reserved -= r->second.block.length;
    count_end(why);
    replacements.erase(r);
  }
  // Ends a replacement whose entry is still visible: the entry stops being protected by it.
  void end_replacement(std::unordered_map<uint64_t, Replacement>::iterator r, ReservationEnd why) {
    const ChunkKey key = r->second.key;
    const uint64_t id = r->first;
    drop_replacement(r, why);
    auto it = index.find(key);
    if (it != index.end() && it->second.replacement_id == id) {
      it->second.replacement_id = 0;
      if (it->second.state == EntryState::kCommitted && !is_protected(it->second)) unprotect(key);
    }
  }

  enum class Removal { kEvicted, kCleared };
  // Takes a visible committed entry out of the index: frees its bytes, or, when leased, keeps
  // them in the detached map until the last lease goes.
  void remove_visible(IndexIt it, Removal why) {
    Entry& e = it->second;
    if (is_protected(e)) {
      --s.protected_entries;
    } else {
      --s.evictable;
      policy->on_remove(it->first);
    }
    if (e.replacement_id != 0) {
      // A replacement being hashed finds its entry gone and drops itself (commit_replacement).
      auto r = replacements.find(e.replacement_id);
      if (r != replacements.end() && !r->second.committing) drop_replacement(r, ReservationEnd::kAborted);
      e.replacement_id = 0;
    }
    if (e.pins > 0) --s.pinned;
    e.pins = 0;
    --s.entries;
    s.bytes_entries -= e.block.length;
    if (why == Removal::kEvicted) {
      ++s.evictions;
    } else {
      ++s.cleared;
    }
    if (e.leases > 0) {
      e.detached = true;
      ++s.detached;
      s.bytes_detached += e.block.length;
      detached.insert(index.extract(it));
      return;
    }
    free_block(e.block);
    index.erase(it);
  }

  void end_reservation(IndexIt it, ReservationEnd why) {
    Entry& e = it->second;
    free_block(e.block);
    --s.reservations;
    s.bytes_reserved -= e.block.length;
    count_end(why);
    reservations.erase(e.reservation_id);
    index.erase(it);
  }

  enum class LeaseEnd { kReleased, kExpired, kDropped };
  void end_lease(std::unordered_map<uint64_t, LeaseRecord>::iterator it, LeaseEnd why) {
    LeaseRecord record = it->second;
    leases.erase(it);
    --s.active_leases;
    switch (why) {
      case LeaseEnd::kReleased:
        ++s.leases_released;
        break;
      case LeaseEnd::kExpired:
        ++s.expired_leases;
        break;
      case LeaseEnd::kDropped:
        ++s.dropped_leases;
        break;
    }
    Entry& e = *record.entry;
    if (--e.leases > 0) return;
    --s.leased_entries;
    if (e.detached) {
      --s.detached;
      s.bytes_detached -= e.block.length;
      free_block(e.block);
      auto [first, last] = detached.equal_range(record.key);
      for (auto d = first; d != last; ++d) {
        if (&d->second == record.entry) {
          detached.erase(d);
          break;
        }
      }
      return;
    }
    if (!is_protected(e)) unprotect(record.key);
  }

  ReapResult reap_locked(StoreClock::time_point t) {
    ReapResult r;
    for (auto it = reservations.begin(); it != reservations.end();) {
      auto entry = index.find(it->second);
      ++it;  // end_reservation erases the current element
      if (entry != index.end() && entry->second.state == EntryState::kReserved &&
          entry->second.deadline <= t) {
        end_reservation(entry, ReservationEnd::kExpired);
        ++r.reservations;
      }
    }
    for (auto it = replacements.begin(); it != replacements.end();) {
      auto current = it++;
      if (!current->second.committing && current->second.deadline <= t) {
        end_replacement(current, ReservationEnd::kExpired);
        ++r.reservations;
      }
    }
    for (auto it = leases.begin(); it != leases.end();) {
      auto current = it++;
      if (current->second.deadline <= t) {
        end_lease(current, LeaseEnd::kExpired);
        ++r.leases;
      }
    }
    return r;
  }

  // A spill in flight: the entry (kSpilling, still in the index) keeps its arena block allocated
  // until its bytes are in `extent` of the SSD tier; written without the mutex (write_spills).
  struct Spill {
    ChunkKey key;
    ArenaBlock block;
    ArenaBlock extent;
    uint64_t bytes = 0;
  };

  void count_spill_failure(const ChunkKey& key, const Status& why) {
    ++s.ssd_spill_failures;
    // The first few, then every 1000th, so that a dead disk does not flood the log.
    if (s.ssd_spill_failures <= 10 || s.ssd_spill_failures % 1000 == 0) {
      spdlog::warn("chunk store: evicted chunk {} dropped, not spilled ({} so far): {}", hex(key),
                   s.ssd_spill_failures, why.to_string());
    }
  }

  // Starts the spill of a visible, committed, unprotected entry: reserves its SSD extent and
  // moves the entry out of the visible set into kSpilling (its block stays allocated). On an
  // error (no extent) nothing has changed.
  Status begin_spill(IndexIt it, std::vector<Spill>& batch) {
    Entry& e = it->second;
    auto extent = ssd->allocate_extent(e.bytes);
    if (!extent.ok()) return extent.status();
    --s.evictable;
    policy->on_remove(it->first);
    --s.entries;
    s.bytes_entries -= e.block.length;
    ++s.spilling;
    s.bytes_spilling += e.block.length;
    e.state = EntryState::kSpilling;
    e.extent = extent.value();
    batch.push_back(Spill{it->first, e.block, e.extent, e.bytes});
    return Status::Ok();
  }

  enum class SpillEnd { kSpilled, kCleared, kDropped, kKept };
  // Ends a spill under the mutex after its write: the entry goes into the SSD index and its block
  // is freed (then out of the SSD index again when a clear marked it meanwhile). A failed write
  // drops the entry (eviction) or, with `keep_on_failure` (demote), makes it a visible DRAM
  // entry again. Wakes the callers waiting for the key.
  SpillEnd land_spill(const Spill& sp, const Status& wrote, bool keep_on_failure) {
    settled.notify_all();
    --s.spilling;
    s.bytes_spilling -= sp.block.length;
    auto it = index.find(sp.key);  // nothing else removes a spilling entry
    Entry& e = it->second;
    const bool cleared = e.cleared_in_flight;
    e.cleared_in_flight = false;
    if (wrote.ok()) {
      ssd->insert(SsdEntry{sp.key, sp.extent, sp.bytes, e.checksum, e.model, e.codec, e.loads});
      ++s.evictions;
      free_block(sp.block);
      index.erase(it);
      if (cleared) ssd->erase(sp.key);
      return cleared ? SpillEnd::kCleared : SpillEnd::kSpilled;
    }
    ssd->release_written(sp.extent);
    if (keep_on_failure) {
      e.state = EntryState::kCommitted;
      ++s.entries;
      s.bytes_entries += sp.block.length;
      ++s.evictable;
      policy->on_insert(sp.key);
      if (cleared) {
        remove_visible(it, Removal::kCleared);
        return SpillEnd::kCleared;
      }
      return SpillEnd::kKept;
    }
    ++s.evictions;
    count_spill_failure(sp.key, wrote);
    free_block(sp.block);
    index.erase(it);
    return SpillEnd::kDropped;
  }

  // Writes a batch of begun spills with the mutex released, then lands them under it.
  std::vector<SpillEnd> write_spills(std::unique_lock<std::mutex>& lock, const std::vector<Spill>& batch,
                                     bool keep_on_failure) {
    std::vector<Status> wrote;
    wrote.reserve(batch.size());
    lock.unlock();
    // The blocks and extents are the spills' (nothing frees a spilling entry's block, nor a
    // writing extent), so both are safe to use without the lock.
    for (const Spill& sp : batch) {
      wrote.push_back(
          ssd->write_at(sp.extent.offset, {arena.data() + sp.block.offset, static_cast<size_t>(sp.bytes)}));
    }
    lock.lock();
    std::vector<SpillEnd> ends;
    ends.reserve(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) ends.push_back(land_spill(batch[i], wrote[i], keep_on_failure));
    return ends;
  }

  // Allocates `bytes`, evicting in policy order; reaps expired holds once before giving up.
  // Without an SSD tier victims are dropped and the lock is held throughout. With one, victims
  // are spilled: as many begun as the allocation needs (by bytes; fragmentation may need another
  // round), written with the lock released, landed, and then the result is nullopt: the lock was
  // released, the caller must check its own state again and call again (the freed blocks are
  // still free then: the lock is not released between the landing and the next call). Likewise
  // nullopt after waiting for other callers' spills when nothing else is evictable.
  Result<std::optional<ArenaBlock>> make_room(std::unique_lock<std::mutex>& lock, uint64_t bytes) {
    bool reaped = false;
    for (;;) {
      if (auto block = allocator.allocate(bytes)) return block;
      std::vector<Spill> batch;
      uint64_t coming = 0;  // arena bytes the batch frees when it lands
      while (auto victim = policy->victim()) {
        auto it = index.find(*victim);
        if (it == index.end() || it->second.state != EntryState::kCommitted || is_protected(it->second)) {
          return Status(ErrorCode::kInternal, "eviction policy offered " + hex(*victim) +
                                                  ", which is not an evictable entry of this store");
        }
        if (ssd) {
          const uint64_t length = it->second.block.length;
          Status begun = begin_spill(it, batch);
          if (begun.ok()) {
            coming += length;
            if (allocator.bytes_free() + coming >= bytes) break;
            continue;
          }
          count_spill_failure(it->first, begun);  // no extent for it: dropped, as without a tier
        }
        remove_visible(it, Removal::kEvicted);
        if (batch.empty()) {
          if (auto block = allocator.allocate(bytes)) return block;
        } else if (allocator.bytes_free() + coming >= bytes) {
          break;
        }
      }
      if (!batch.empty()) {
        write_spills(lock, batch, false);
        return std::optional<ArenaBlock>{};
      }
      if (s.spilling > 0) {  // other callers' spills will free blocks
        settled.wait(lock);
        return std::optional<ArenaBlock>{};
      }
      if (reaped) break;
      reaped = true;
      ReapResult r = reap_locked(now());
      if (r.reservations == 0 && r.leases == 0) break;
    }
    return Status(ErrorCode::kOutOfMemory,
                  "store full: cannot place " + std::to_string(bytes) + " bytes (" +
                      std::to_string(allocator.bytes_free()) + " of " + std::to_string(allocator.capacity()) +
                      " free, largest hole " + std::to_string(allocator.largest_free()) +
                      ") and nothing is evictable: " + std::to_string(s.pinned) + " entries pinned, " +
                      std::to_string(s.leased_entries) + " leased, " + std::to_string(s.reservations) +
                      " reservations being written, " + std::to_string(s.promoting) +
                      " entries being read from the ssd tier");
  }

  // make_room until it gives a block or fails.
  Result<ArenaBlock> allocate_evicting(std::unique_lock<std::mutex>& lock, uint64_t bytes) {
    for (;;) {
      auto room = make_room(lock, bytes);
      if (!room.ok()) return room.status();
      if (room.value()) return *room.value();
    }
  }

  // Moves an entry of the SSD tier into the arena; see chunk_store.h. Called with `lock` held and
  // the key in the SSD index; unlocks while space is made and while the bytes are read and
  // hashed. Returns the committed entry with the lock held. Waiters on the key are woken however
  // it ends.
  Result<IndexIt> promote_locked(std::unique_lock<std::mutex>& lock, const ChunkKey& key) {
    // Out of the SSD index first, so that spills made to free arena space cannot evict it, and
    // into the DRAM index as kPromoting with no block yet, so that other callers of the key wait
    // for it and lookups count it as in the SSD tier while space is made.
    std::optional<SsdEntry> taken = ssd->take(key);
    if (!taken)
      return Status(ErrorCode::kInternal, "promotion of chunk " + hex(key) + ": not in the ssd tier");
    ++s.promoting;
    {
      Entry e;
      e.bytes = taken->bytes;
      e.checksum = taken->checksum;
      e.model = taken->model;
      e.codec = taken->codec;
      e.loads = taken->loads;
      e.extent = taken->extent;
      e.state = EntryState::kPromoting;
      index.emplace(key, e);
    }
    // Nothing else removes a promoting entry (a clear marks it), so the lookups below find it.
    auto block = allocate_evicting(lock, taken->bytes);
    if (!block.ok()) {
      auto it = index.find(key);
      const bool cleared = it->second.cleared_in_flight;
      index.erase(it);
      ssd->restore(*taken);
      if (cleared) ssd->erase(key);
      --s.promoting;
      settled.notify_all();
      return Status(
          block.status().code(),
          "chunk " + hex(key) + " is in the ssd tier and cannot be loaded: " + block.status().message());
    }
    const ArenaBlock placed = block.value();
    index.find(key)->second.block = placed;
    s.bytes_promoting += placed.length;
    std::span<uint8_t> dst(arena.data() + placed.offset, static_cast<size_t>(taken->bytes));
    lock.unlock();
    // The block is the promotion's (nothing frees a promoting entry) and the extent stays
    // allocated until release_extent, so both are safe to use without the lock.
    Status read = ssd->read(*taken, dst);
    lock.lock();
    ssd->release_extent(taken->extent);
    --s.promoting;
    s.bytes_promoting -= placed.length;
    settled.notify_all();
    auto it = index.find(key);
    if (it == index.end() || it->second.state != EntryState::kPromoting) {
      return Status(ErrorCode::kInternal, "promotion of chunk " + hex(key) + ": its entry vanished");
    }
    if (!read.ok()) {
      ++s.ssd_dropped;
      free_block(placed);
      index.erase(it);
      spdlog::warn("chunk store: chunk {} dropped from the ssd tier: {}", hex(key), read.to_string());
      return read;
    }
    it->second.state = EntryState::kCommitted;
    ++s.entries;
    s.bytes_entries += placed.length;
    ++s.evictable;
    ++s.promotions;
    policy->on_insert(key);
    if (it->second.cleared_in_flight) {
      it->second.cleared_in_flight = false;
      remove_visible(it, Removal::kCleared);
      return Status(ErrorCode::kNotFound,
                    "chunk " + hex(key) + " was cleared while it was read from the ssd tier");
    }
    return it;
  }

  static bool in_flight(const Entry& e) {
    return e.state == EntryState::kPromoting || e.state == EntryState::kSpilling;
  }

  // The committed DRAM entry of `key`: waits out a promotion or a spill in progress, promotes an
  // SSD entry. Counts a hit of the tier it was found in, or a miss, when `count`. kNotFound when
  // not stored.
  Result<IndexIt> resolve_locked(std::unique_lock<std::mutex>& lock, const ChunkKey& key, bool count,
                                 const std::string& what) {
    for (;;) {
      auto it = index.find(key);
      if (it != index.end()) {
        if (it->second.state == EntryState::kCommitted) {
          if (count) ++s.hits;
          return it;
        }
        if (in_flight(it->second)) {
          settled.wait(lock);
          continue;
        }
        break;  // reserved or committing: not stored yet
      }
      if (ssd && ssd->contains(key)) {
        if (count) ++s.ssd_hits;
        return promote_locked(lock, key);
      }
      break;
    }
    if (count) {
      ++s.misses;
      if (ssd) ++s.ssd_misses;
    }
    return Status(ErrorCode::kNotFound, what + "chunk " + hex(key) + " is not stored");
  }

  // The DRAM entry of `key` once no promotion or spill of it is in progress (end() when there is
  // none).
  IndexIt settled_locked(std::unique_lock<std::mutex>& lock, const ChunkKey& key) {
    for (;;) {
      auto it = index.find(key);
      if (it == index.end() || !in_flight(it->second)) return it;
      settled.wait(lock);
    }
  }

  // Counts the matched prefix of a chain across both tiers; the tier of each matched key into
  // `tiers` when given. Entries being promoted or spilled count as in the SSD tier.
  size_t match_locked(std::span<const ChunkKey> keys, std::vector<Tier>* tiers) {
    size_t matched = 0;
    for (const ChunkKey& key : keys) {
      Tier tier = Tier::kDram;
      auto it = index.find(key);
      if (it != index.end() && it->second.state == EntryState::kCommitted) {
        ++s.hits;
      } else if ((it != index.end() && in_flight(it->second)) ||
                 (it == index.end() && ssd && ssd->contains(key))) {
        ++s.ssd_hits;
        tier = Tier::kSsd;
      } else {
        ++s.misses;
        if (ssd) ++s.ssd_misses;
        break;
      }
      if (tiers) tiers->push_back(tier);
      ++matched;
    }
    return matched;
  }

  // How a clear treats one DRAM index entry: removes a committed one, marks one in flight (counted
  // as an SSD entry: its extent's bytes).
  void clear_entry(IndexIt it, ClearResult& r) {
    Entry& e = it->second;
    if (in_flight(e)) {
      if (!e.cleared_in_flight) {
        e.cleared_in_flight = true;
        ++r.removed;
        r.bytes += e.extent.length;
      }
      return;
    }
    if (e.state != EntryState::kCommitted) return;
    if (e.leases > 0) ++r.deferred;
    r.bytes += e.block.length;
    remove_visible(it, Removal::kCleared);
    ++r.removed;
  }
  void count_ssd_cleared(const std::vector<SsdEntry>& removed, ClearResult& r) {
    for (const auto& e : removed) {
      ++r.removed;
      r.bytes += e.extent.length;
    }
  }

  StoreStats snapshot() const {
    StoreStats out = s;
    out.capacity_bytes = allocator.capacity();
    out.bytes_used = allocator.bytes_used();
    out.bytes_free = allocator.bytes_free();
    out.largest_free_block = allocator.largest_free();
    if (ssd) {
      const SsdTierStats t = ssd->stats();
      out.ssd_capacity_bytes = t.capacity_bytes;
      out.ssd_bytes_used = t.bytes_used;
      out.ssd_bytes_free = t.bytes_free;
      out.ssd_bytes_entries = t.bytes_entries;
      out.ssd_bytes_promoting = t.bytes_taken;
      out.ssd_bytes_spilling = t.bytes_writing;
      out.ssd_entries = t.entries;
      out.ssd_spills = t.puts;
      out.ssd_evictions = t.evictions;
      out.ssd_cleared = t.erases;
      out.ssd_bytes_written = t.bytes_written;
      out.ssd_bytes_read = t.bytes_read;
    }
    return out;
  }

  gpudirect::MemoryRegion arena;
  ArenaAllocator allocator;
  ChunkStoreOptions options;
  std::unique_ptr<EvictionPolicy> policy;
  std::unique_ptr<SsdTier> ssd;  // null: no SSD tier

  mutable std::mutex mu;
  std::condition_variable settled;                      // a promotion or a spill ended (either way)
  std::unordered_map<ChunkKey, Entry> index;            // reserved, committing, committed, promoting entries
  std::unordered_multimap<ChunkKey, Entry> detached;    // cleared (or re-encoded) while leased
  std::unordered_map<uint64_t, ChunkKey> reservations;  // reservation id -> key (not yet committed)
  std::unordered_map<uint64_t, Replacement> replacements;  // reservation id -> replacement
  std::unordered_map<uint64_t, LeaseRecord> leases;
  std::unordered_set<uint64_t> pending_replacements;  // replacement ids whose block is being made room for
  uint64_t next_reservation_id = 1;
  uint64_t next_lease_id = 1;
  StoreStats s;  // gauges and counters; the arena and SSD tier fields are filled in by snapshot()
};

Result<std::unique_ptr<ChunkStore>> ChunkStore::create(gpudirect::MemoryRegion arena,
                                                       ChunkStoreOptions options) {
  if (arena.kind() == protocol::MemoryKind::kCudaDevice || arena.data() == nullptr) {
    return Status(ErrorCode::kInvalidArgument, "the store arena must be host memory the CPU can address");
  }
  if (options.reservation_timeout <= StoreClock::duration::zero() ||
      options.lease_timeout <= StoreClock::duration::zero()) {
    return Status(ErrorCode::kInvalidArgument, "store reservation and lease timeouts must be positive");
  }
  auto allocator = ArenaAllocator::create(arena.size(), options.alignment);
  if (!allocator.ok()) return allocator.status();
  std::unique_ptr<SsdTier> ssd;
  if (options.ssd) {
    auto opened = SsdTier::open(*options.ssd);
    if (!opened.ok()) return opened.status();
    ssd = std::move(opened.value());
  }
  auto impl = std::make_unique<Impl>(std::move(arena), std::move(allocator.value()), std::move(options),
                                     std::move(ssd));
  return std::unique_ptr<ChunkStore>(new ChunkStore(std::move(impl)));
}

ChunkStore::ChunkStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ChunkStore::~ChunkStore() = default;

const gpudirect::MemoryRegion& ChunkStore::arena() const {
  return impl_->arena;
}

const SsdTier* ChunkStore::ssd_tier() const {
  return impl_->ssd.get();
}

std::span<uint8_t> ChunkStore::bytes(const Reservation& r) const {
  return {impl_->arena.data() + r.offset, static_cast<size_t>(r.length)};
}

std::span<const uint8_t> ChunkStore::bytes(const Lease& l) const {
  return {impl_->arena.data() + l.offset, static_cast<size_t>(l.length)};
}

Result<Reservation> ChunkStore::reserve(const ChunkKey& key, uint64_t bytes, ClientId writer,
                                        const ChunkKey& model, KvCodec codec) {
  Impl& m = *impl_;
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "reserve of chunk " + hex(key) + ": zero bytes");
  if (bytes > m.allocator.capacity()) {
    return Status(ErrorCode::kInvalidArgument, "reserve of chunk " + hex(key) + ": " + std::to_string(bytes) +
                                                   " bytes can never fit a store arena of " +
                                                   std::to_string(m.allocator.capacity()));
  }
  std::unique_lock lock(m.mu);
  ArenaBlock block;
  for (;;) {  // checked again whenever making room released the lock
    if (auto it = m.index.find(key); it != m.index.end()) {
      switch (it->second.state) {
        case EntryState::kCommitted:
          return Status(ErrorCode::kAborted, "chunk " + hex(key) + " is already stored");
        case EntryState::kPromoting:
          return Status(ErrorCode::kAborted,
                        "chunk " + hex(key) + " is already stored (being read from the ssd tier)");
        case EntryState::kSpilling:
          return Status(ErrorCode::kAborted,
                        "chunk " + hex(key) + " is already stored (being written to the ssd tier)");
        default:
          return Status(ErrorCode::kAborted, "chunk " + hex(key) + " is being stored by writer " +
                                                 std::to_string(it->second.writer));
      }
    }
    if (m.ssd && m.ssd->contains(key)) {
      return Status(ErrorCode::kAborted, "chunk " + hex(key) + " is already stored (in the ssd tier)");
    }
    auto room = m.make_room(lock, bytes);
    if (!room.ok()) return room.status();
    if (room.value()) {
      block = *room.value();
      break;
    }
  }
  Entry e;
  e.block = block;
  e.bytes = bytes;
  e.model = model;
  e.codec = codec;
  e.reservation_id = m.next_reservation_id++;
  e.writer = writer;
  e.deadline = m.now() + m.options.reservation_timeout;
  m.index.emplace(key, e);
  m.reservations.emplace(e.reservation_id, key);
  ++m.s.reserves;
  ++m.s.reservations;
  m.s.bytes_reserved += e.block.length;
  return Reservation{key, e.reservation_id, e.block.offset, bytes};
}

Status ChunkStore::commit(const ChunkKey& key, uint64_t reservation_id,
                          std::optional<uint64_t> expected_checksum) {
  Impl& m = *impl_;
  const uint8_t* data = nullptr;
  uint64_t length = 0;
  {
    std::lock_guard lock(m.mu);
    auto it = m.index.find(key);
    if (it == m.index.end() || it->second.reservation_id != reservation_id ||
        it->second.state == EntryState::kPromoting) {
      return Status(ErrorCode::kNotFound, "commit of chunk " + hex(key) + ": no reservation " +
                                              std::to_string(reservation_id) +
                                              " (aborted, expired, dropped or never made)");
    }
    Entry& e = it->second;
    if (e.state == EntryState::kCommitted || e.state == EntryState::kSpilling) {
      return Status(ErrorCode::kInvalidArgument, "commit of chunk " + hex(key) + ": already committed");
    }
    if (e.state == EntryState::kCommitting) {
      return Status(ErrorCode::kInvalidArgument, "commit of chunk " + hex(key) + ": a commit is in progress");
    }
    // Committing entries are skipped by reaping, aborts, clears and drop_client, so the bytes and
    // the entry stay put while we hash without the lock.
    e.state = EntryState::kCommitting;
    data = m.arena.data() + e.block.offset;
    length = e.bytes;
  }
  uint64_t sum = chunk_checksum_parallel(data, length);
  std::lock_guard lock(m.mu);
  auto it = m.index.find(key);
  if (it == m.index.end() || it->second.reservation_id != reservation_id) {
    return Status(ErrorCode::kInternal, "commit of chunk " + hex(key) + ": entry vanished while committing");
  }
  Entry& e = it->second;
  if (expected_checksum && *expected_checksum != sum) {
    e.state = EntryState::kReserved;  // still the writer's to abort (or to rewrite and commit)
    return Status(ErrorCode::kVerifyFailed,
                  "commit of chunk " + hex(key) + ": its bytes do not match the expected checksum");
  }
  e.state = EntryState::kCommitted;
  e.checksum = sum;
  m.reservations.erase(reservation_id);
  --m.s.reservations;
  m.s.bytes_reserved -= e.block.length;
  ++m.s.entries;
  m.s.bytes_entries += e.block.length;
  ++m.s.evictable;
  ++m.s.inserts;
  m.policy->on_insert(key);
  return Status::Ok();
}

Status ChunkStore::abort(const ChunkKey& key, uint64_t reservation_id) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  auto it = m.index.find(key);
  if (it != m.index.end() && it->second.reservation_id == reservation_id &&
      it->second.state != EntryState::kPromoting) {
    if (it->second.state != EntryState::kReserved) {
      return Status(ErrorCode::kInvalidArgument,
                    "abort of chunk " + hex(key) + ": already committed or committing");
    }
    m.end_reservation(it, Impl::ReservationEnd::kAborted);
    return Status::Ok();
  }
  if (auto r = m.replacements.find(reservation_id); r != m.replacements.end() && r->second.key == key) {
    if (r->second.committing) {
      return Status(ErrorCode::kInvalidArgument,
                    "abort of chunk " + hex(key) + ": its replacement is committing");
    }
    m.end_replacement(r, Impl::ReservationEnd::kAborted);
    return Status::Ok();
  }
  return Status(ErrorCode::kNotFound,
                "abort of chunk " + hex(key) + ": no reservation " + std::to_string(reservation_id));
}

Result<Reservation> ChunkStore::reserve_replacement(const ChunkKey& key, uint64_t bytes, KvCodec codec,
                                                    ClientId writer) {
  Impl& m = *impl_;
  if (bytes == 0) {
    return Status(ErrorCode::kInvalidArgument, "replacement of chunk " + hex(key) + ": zero bytes");
  }
  if (bytes > m.allocator.capacity()) {
    return Status(ErrorCode::kInvalidArgument,
                  "replacement of chunk " + hex(key) + ": " + std::to_string(bytes) +
                      " bytes can never fit a store arena of " + std::to_string(m.allocator.capacity()));
  }
  std::unique_lock lock(m.mu);
  auto found = m.resolve_locked(lock, key, false, "replacement: ");
  if (!found.ok()) return found.status();
  Entry& e = found.value()->second;
  if (e.replacement_id != 0) {
    return Status(ErrorCode::kAborted, "replacement of chunk " + hex(key) + ": another one is being written");
  }
  const uint64_t id = m.next_reservation_id++;
  if (!Impl::is_protected(e)) m.protect(key);  // not evicted to make room for its own replacement
  e.replacement_id = id;
  m.pending_replacements.insert(id);  // for audit() while making room releases the lock
  ArenaBlock block;
  for (;;) {
    auto room = m.make_room(lock, bytes);
    // The entry may have been cleared while the lock was released (remove_visible resets its
    // replacement id); the key may even be stored again by then.
    auto it = m.index.find(key);
    const bool still =
        it != m.index.end() && it->second.state == EntryState::kCommitted && it->second.replacement_id == id;
    if (room.ok() && room.value() && still) {
      block = *room.value();
      break;
    }
    if (room.ok() && !room.value() && still) continue;
    if (room.ok() && room.value()) m.free_block(*room.value());
    m.pending_replacements.erase(id);
    if (still) {
      it->second.replacement_id = 0;
      if (!Impl::is_protected(it->second)) m.unprotect(key);
    }
    if (!room.ok()) return room.status();
    return Status(ErrorCode::kNotFound, "replacement of chunk " + hex(key) + ": it was cleared meanwhile");
  }
  m.pending_replacements.erase(id);
  m.replacements.emplace(
      id, Replacement{key, block, bytes, codec, writer, m.now() + m.options.reservation_timeout, false});
  ++m.s.reserves;
  ++m.s.reservations;
  m.s.bytes_reserved += block.length;
  return Reservation{key, id, block.offset, bytes};
}

Status ChunkStore::commit_replacement(const ChunkKey& key, uint64_t reservation_id,
                                      std::optional<uint64_t> expected_checksum) {
  Impl& m = *impl_;
  const uint8_t* data = nullptr;
  uint64_t length = 0;
  {
    std::lock_guard lock(m.mu);
    auto r = m.replacements.find(reservation_id);
    if (r == m.replacements.end() || !(r->second.key == key)) {
      return Status(ErrorCode::kNotFound, "commit of the replacement of chunk " + hex(key) +
                                              ": no reservation " + std::to_string(reservation_id) +
                                              " (aborted, expired, dropped, cleared or never made)");
    }
    if (r->second.committing) {
      return Status(ErrorCode::kInvalidArgument,
                    "commit of the replacement of chunk " + hex(key) + ": a commit is in progress");
    }
    r->second.committing = true;  // its block stays put while we hash without the lock
    data = m.arena.data() + r->second.block.offset;
    length = r->second.bytes;
  }
  const uint64_t sum = chunk_checksum_parallel(data, length);
  std::lock_guard lock(m.mu);
  auto r = m.replacements.find(reservation_id);
  if (r == m.replacements.end()) {
    return Status(ErrorCode::kInternal, "commit of the replacement of chunk " + hex(key) + ": it vanished");
  }
  auto it = m.index.find(key);
  if (it == m.index.end() || it->second.replacement_id != reservation_id ||
      it->second.state != EntryState::kCommitted) {
    m.drop_replacement(r, Impl::ReservationEnd::kAborted);
    return Status(ErrorCode::kNotFound, "commit of the replacement of chunk " + hex(key) +
                                            ": the entry was cleared meanwhile; the replacement is dropped");
  }
  if (expected_checksum && *expected_checksum != sum) {
    r->second.committing = false;
    return Status(ErrorCode::kVerifyFailed, "commit of the replacement of chunk " + hex(key) +
                                                ": its bytes do not match the expected checksum");
  }
  Entry& e = it->second;
  const Replacement rep = r->second;
  const ArenaBlock old = e.block;
  if (e.leases > 0) {
    // Readers keep the old bytes: they move to a detached copy of the entry that their leases
    // now point at, freed on the last release as any detached entry.
    Entry ghost = e;
    ghost.detached = true;
    ghost.pins = 0;
    ghost.replacement_id = 0;
    Entry* moved = &m.detached.emplace(key, ghost)->second;
    for (auto& [lease_id, l] : m.leases) {
      if (l.entry == &e) l.entry = moved;
    }
    ++m.s.detached;
    m.s.bytes_detached += old.length;
    e.leases = 0;  // leased_entries is unchanged: the detached copy is the leased one now
  } else {
    m.free_block(old);
  }
  m.s.bytes_entries = m.s.bytes_entries - old.length + rep.block.length;
  e.block = rep.block;
  e.bytes = rep.bytes;
  e.codec = rep.codec;
  e.checksum = sum;
  e.replacement_id = 0;
  --m.s.reservations;
  m.s.bytes_reserved -= rep.block.length;
  ++m.s.replacements;
  m.replacements.erase(r);
  if (!Impl::is_protected(e)) m.unprotect(key);
  return Status::Ok();
}

size_t ChunkStore::lookup(std::span<const ChunkKey> keys) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  return m.match_locked(keys, nullptr);
}

std::vector<Tier> ChunkStore::lookup_tiers(std::span<const ChunkKey> keys) {
  Impl& m = *impl_;
  std::vector<Tier> tiers;
  std::lock_guard lock(m.mu);
  m.match_locked(keys, &tiers);
  return tiers;
}

std::optional<EntryInfo> ChunkStore::peek(const ChunkKey& key) const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  auto it = m.index.find(key);
  if (it != m.index.end()) {
    const Entry& e = it->second;
    if (listed(e)) return info_of(e);
    return std::nullopt;
  }
  if (m.ssd) {
    if (const SsdEntry* e = m.ssd->find(key)) return info_of(*e);
  }
  return std::nullopt;
}

std::vector<std::pair<ChunkKey, EntryInfo>> ChunkStore::entries() const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  std::vector<std::pair<ChunkKey, EntryInfo>> out;
  out.reserve(m.s.entries + m.s.promoting + m.s.spilling + (m.ssd ? m.ssd->stats().entries : 0));
  for (const auto& [key, e] : m.index) {
    if (listed(e)) out.emplace_back(key, info_of(e));
  }
  if (m.ssd) m.ssd->for_each([&out](const SsdEntry& e) { out.emplace_back(e.key, info_of(e)); });
  return out;
}

EntryTotals ChunkStore::totals() const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  EntryTotals t;
  for (const auto& [key, e] : m.index) {
    if (!listed(e)) continue;
    ++t.entries;
    t.bytes += e.bytes;
  }
  if (m.ssd) {
    m.ssd->for_each([&t](const SsdEntry& e) {
      ++t.entries;
      t.bytes += e.bytes;
    });
  }
  return t;
}

std::vector<ChunkKey> ChunkStore::keys() const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  std::vector<ChunkKey> out;
  for (const auto& [key, e] : m.index) {
    if (listed(e)) out.push_back(key);
  }
  if (m.ssd) m.ssd->for_each([&out](const SsdEntry& e) { out.push_back(e.key); });
  return out;
}

Result<Lease> ChunkStore::acquire(const ChunkKey& key, ClientId reader) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  auto found = m.resolve_locked(lock, key, true, "");
  if (!found.ok()) return found.status();
  Entry& e = found.value()->second;
  if (!Impl::is_protected(e)) m.protect(key);
  if (e.leases++ == 0) ++m.s.leased_entries;
  ++e.loads;
  uint64_t id = m.next_lease_id++;
  m.leases.emplace(id, LeaseRecord{key, &e, reader, m.now() + m.options.lease_timeout});
  ++m.s.leases_granted;
  ++m.s.active_leases;
  return Lease{id, key, e.block.offset, e.bytes, e.checksum, e.model, e.codec};
}

Status ChunkStore::release(uint64_t lease_id) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  auto it = m.leases.find(lease_id);
  if (it == m.leases.end()) {
    return Status(ErrorCode::kNotFound, "lease " + std::to_string(lease_id) +
                                            " is unknown: released already, expired or dropped (bytes read "
                                            "under an expired lease may have been reused: verify them)");
  }
  m.end_lease(it, Impl::LeaseEnd::kReleased);
  return Status::Ok();
}

Status ChunkStore::verify(const Lease& lease) const {
  const auto& arena = impl_->arena;
  if (lease.offset > arena.size() || lease.length > arena.size() - lease.offset) {
    return Status(ErrorCode::kInvalidArgument,
                  "lease " + std::to_string(lease.id) + " lies outside the arena");
  }
  uint64_t sum = chunk_checksum_parallel(arena.data() + lease.offset, lease.length);
  if (sum != lease.checksum) {
    return Status(ErrorCode::kVerifyFailed,
                  "chunk " + hex(lease.key) + ": checksum of the stored bytes differs");
  }
  return Status::Ok();
}

Status ChunkStore::pin(const ChunkKey& key) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  auto found = m.resolve_locked(lock, key, false, "pin: ");
  if (!found.ok()) return found.status();
  Entry& e = found.value()->second;
  if (!Impl::is_protected(e)) m.protect(key);
  if (e.pins++ == 0) ++m.s.pinned;
  return Status::Ok();
}

Status ChunkStore::unpin(const ChunkKey& key) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  auto it = m.settled_locked(lock, key);
  if (it == m.index.end() || it->second.state != EntryState::kCommitted) {
    if (it == m.index.end() && m.ssd && m.ssd->contains(key)) {
      return Status(ErrorCode::kInvalidArgument,
                    "unpin of chunk " + hex(key) + ": not pinned (in the ssd tier)");
    }
    return Status(ErrorCode::kNotFound, "unpin of chunk " + hex(key) + ": not stored");
  }
  Entry& e = it->second;
  if (e.pins == 0) return Status(ErrorCode::kInvalidArgument, "unpin of chunk " + hex(key) + ": not pinned");
  if (--e.pins == 0) {
    --m.s.pinned;
    if (!Impl::is_protected(e)) m.unprotect(key);
  }
  return Status::Ok();
}

Status ChunkStore::demote(const ChunkKey& key) {
  Impl& m = *impl_;
  std::unique_lock lock(m.mu);
  if (!m.ssd)
    return Status(ErrorCode::kUnavailable, "demote of chunk " + hex(key) + ": the store has no ssd tier");
  auto it = m.index.end();
  for (;;) {
    it = m.index.find(key);
    if (it == m.index.end()) {
      if (m.ssd->contains(key)) return Status::Ok();
      return Status(ErrorCode::kNotFound, "demote of chunk " + hex(key) + ": not stored");
    }
    if (it->second.state != EntryState::kSpilling) break;
    m.settled.wait(lock);  // being evicted: see where it lands
  }
  Entry& e = it->second;
  switch (e.state) {
    case EntryState::kCommitted:
      break;
    case EntryState::kPromoting:
      return Status(ErrorCode::kAborted,
                    "demote of chunk " + hex(key) + ": it is being promoted from the ssd tier");
    default:
      return Status(ErrorCode::kNotFound, "demote of chunk " + hex(key) + ": not committed yet");
  }
  if (e.pins > 0) return Status(ErrorCode::kAborted, "demote of chunk " + hex(key) + ": it is pinned");
  if (e.leases > 0) return Status(ErrorCode::kAborted, "demote of chunk " + hex(key) + ": it is leased");
  if (e.replacement_id != 0) {
    return Status(ErrorCode::kAborted, "demote of chunk " + hex(key) + ": it is being re-encoded");
  }
  // The same path as an eviction's spill: the write runs without the mutex.
  std::vector<Impl::Spill> batch;
  if (Status begun = m.begin_spill(it, batch); !begun.ok()) {
    // No extent: the entry stays in DRAM as it was. A chunk larger than the tier is a full tier to
    // the caller.
    const ErrorCode code =
        begun.code() == ErrorCode::kOutOfMemory || begun.code() == ErrorCode::kInvalidArgument
            ? ErrorCode::kOutOfMemory
            : ErrorCode::kInternal;
    return Status(code, "demote of chunk " + hex(key) +
                            ": the ssd tier cannot take it (it stays in dram): " + begun.message());
  }
  const Impl::Spill spill = batch.front();
  lock.unlock();
  Status wrote = m.ssd->write_at(spill.extent.offset,
                                 {m.arena.data() + spill.block.offset, static_cast<size_t>(spill.bytes)});
  lock.lock();
  if (m.land_spill(spill, wrote, true) == Impl::SpillEnd::kKept) {
    return Status(ErrorCode::kInternal, "demote of chunk " + hex(key) +
                                            ": the write failed (it stays in dram): " + wrote.message());
  }
  return Status::Ok();  // in the SSD tier now (or cleared meanwhile)
}

ClearResult ChunkStore::clear_all() {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  ClearResult r;
  for (auto it = m.index.begin(); it != m.index.end();) {
    auto current = it++;  // remove_visible erases or extracts only the current element
    m.clear_entry(current, r);
  }
  if (m.ssd) m.count_ssd_cleared(m.ssd->clear(), r);
  return r;
}

ClearResult ChunkStore::clear(std::span<const ChunkKey> keys) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  ClearResult r;
  for (const ChunkKey& key : keys) {
    auto it = m.index.find(key);
    if (it != m.index.end()) {
      m.clear_entry(it, r);
    } else if (m.ssd) {
      if (const SsdEntry* e = m.ssd->find(key)) {
        ++r.removed;
        r.bytes += e->extent.length;
        m.ssd->erase(key);
      }
    }
  }
  return r;
}

ClearResult ChunkStore::clear_model(const ChunkKey& model) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  ClearResult r;
  for (auto it = m.index.begin(); it != m.index.end();) {
    auto current = it++;  // remove_visible erases or extracts only the current element
    if (current->second.model == model) m.clear_entry(current, r);
  }
  if (m.ssd)
    m.count_ssd_cleared(m.ssd->erase_if([&model](const SsdEntry& e) { return e.model == model; }), r);
  return r;
}

ReapResult ChunkStore::reap_expired(StoreClock::time_point now) {
  std::lock_guard lock(impl_->mu);
  return impl_->reap_locked(now);
}

ReapResult ChunkStore::drop_client(ClientId client) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  ReapResult r;
  for (auto it = m.reservations.begin(); it != m.reservations.end();) {
    auto entry = m.index.find(it->second);
    ++it;
    if (entry != m.index.end() && entry->second.state == EntryState::kReserved &&
        entry->second.writer == client) {
      m.end_reservation(entry, Impl::ReservationEnd::kDropped);
      ++r.reservations;
    }
  }
  for (auto it = m.replacements.begin(); it != m.replacements.end();) {
    auto current = it++;
    if (!current->second.committing && current->second.writer == client) {
      m.end_replacement(current, Impl::ReservationEnd::kDropped);
      ++r.reservations;
    }
  }
  for (auto it = m.leases.begin(); it != m.leases.end();) {
    auto current = it++;
    if (current->second.reader == client) {
      m.end_lease(current, Impl::LeaseEnd::kDropped);
      ++r.leases;
    }
  }
  return r;
}

StoreStats ChunkStore::stats() const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  return m.snapshot();
}

Status ChunkStore::audit() const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  StoreStats reported = m.snapshot();
  auto mismatch = [](const std::string& what, uint64_t counted, uint64_t kept) {
    return Status(ErrorCode::kInternal, "store audit: " + what + " counted " + std::to_string(counted) +
                                            ", stats say " + std::to_string(kept));
  };
  StoreStats c;  // recounted from the structures
  std::vector<ArenaBlock> blocks;
  uint64_t lease_refs = 0;
  for (const auto& [key, e] : m.index) {
    if (e.block.length != 0) blocks.push_back(e.block);  // none yet: a promotion making room
    if (e.detached) return Status(ErrorCode::kInternal, "store audit: detached entry in the index");
    if (m.ssd && m.ssd->contains(key)) {
      return Status(ErrorCode::kInternal, "store audit: chunk " + hex(key) + " is in both tiers");
    }
    if (e.state == EntryState::kPromoting) {
      ++c.promoting;
      c.bytes_promoting += e.block.length;
      if (e.pins != 0 || e.leases != 0 || e.replacement_id != 0 || e.reservation_id != 0) {
        return Status(ErrorCode::kInternal, "store audit: promoting entry " + hex(key) + " is held");
      }
      continue;
    }
    if (e.state == EntryState::kSpilling) {
      ++c.spilling;
      c.bytes_spilling += e.block.length;
      if (e.pins != 0 || e.leases != 0 || e.replacement_id != 0 || !m.ssd) {
        return Status(ErrorCode::kInternal, "store audit: spilling entry " + hex(key) + " is held");
      }
      continue;
    }
    if (e.state != EntryState::kCommitted) {
      ++c.reservations;
      c.bytes_reserved += e.block.length;
      auto r = m.reservations.find(e.reservation_id);
      if (r == m.reservations.end() || !(r->second == key)) {
        return Status(ErrorCode::kInternal, "store audit: reservation of " + hex(key) + " is not registered");
      }
      if (e.pins != 0 || e.leases != 0 || e.replacement_id != 0) {
        return Status(ErrorCode::kInternal, "store audit: held reservation");
      }
      continue;
    }
    ++c.entries;
    c.bytes_entries += e.block.length;
    if (e.pins > 0) ++c.pinned;
    if (e.leases > 0) ++c.leased_entries;
    if (Impl::is_protected(e)) {
      ++c.protected_entries;
    } else {
      ++c.evictable;
    }
    if (e.replacement_id != 0) {
      auto r = m.replacements.find(e.replacement_id);
      const bool pending = m.pending_replacements.count(e.replacement_id) != 0;
      if (!pending && (r == m.replacements.end() || !(r->second.key == key))) {
        return Status(ErrorCode::kInternal, "store audit: replacement of " + hex(key) + " is not registered");
      }
    }
    lease_refs += e.leases;
  }
  for (const auto& [id, r] : m.replacements) {
    blocks.push_back(r.block);
    ++c.reservations;
    c.bytes_reserved += r.block.length;
    auto it = m.index.find(r.key);
    const bool attached = it != m.index.end() && it->second.replacement_id == id;
    if (!attached && !r.committing) {
      return Status(ErrorCode::kInternal, "store audit: replacement " + std::to_string(id) + " has no entry");
    }
  }
  for (const auto& [key, e] : m.detached) {
    blocks.push_back(e.block);
    ++c.detached;
    c.bytes_detached += e.block.length;
    if (!e.detached || e.leases == 0) {
      return Status(ErrorCode::kInternal, "store audit: detached entry " + hex(key) + " without leases");
    }
    ++c.leased_entries;
    lease_refs += e.leases;
  }
  for (const auto& [id, l] : m.leases) {
    if (!(l.entry->state == EntryState::kCommitted)) {
      return Status(ErrorCode::kInternal,
                    "store audit: lease " + std::to_string(id) + " on an uncommitted entry");
    }
  }
  if (lease_refs != m.leases.size()) return mismatch("lease references", lease_refs, m.leases.size());
  if (m.reservations.size() + m.replacements.size() != c.reservations) {
    return mismatch("reservations", c.reservations, m.reservations.size() + m.replacements.size());
  }
  if (m.policy->size() != c.evictable)
    return mismatch("policy size vs evictable", c.evictable, m.policy->size());
  std::sort(blocks.begin(), blocks.end(),
            [](const ArenaBlock& a, const ArenaBlock& b) { return a.offset < b.offset; });
  uint64_t used = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    used += blocks[i].length;
    if (i > 0 && blocks[i - 1].offset + blocks[i - 1].length > blocks[i].offset) {
      return Status(ErrorCode::kInternal,
                    "store audit: blocks overlap at offset " + std::to_string(blocks[i].offset));
    }
  }
  if (used != m.allocator.bytes_used()) return mismatch("allocated bytes", used, m.allocator.bytes_used());
  if (c.entries != reported.entries) return mismatch("entries", c.entries, reported.entries);
  if (c.reservations != reported.reservations)
    return mismatch("reservations", c.reservations, reported.reservations);
  if (c.promoting != reported.promoting) return mismatch("promoting", c.promoting, reported.promoting);
  if (c.bytes_promoting != reported.bytes_promoting)
    return mismatch("promoting bytes", c.bytes_promoting, reported.bytes_promoting);
  if (c.spilling != reported.spilling) return mismatch("spilling", c.spilling, reported.spilling);
  if (c.bytes_spilling != reported.bytes_spilling)
    return mismatch("spilling bytes", c.bytes_spilling, reported.bytes_spilling);
  if (c.detached != reported.detached) return mismatch("detached", c.detached, reported.detached);
  if (c.pinned != reported.pinned) return mismatch("pinned", c.pinned, reported.pinned);
  if (c.leased_entries != reported.leased_entries)
    return mismatch("leased", c.leased_entries, reported.leased_entries);
  if (c.protected_entries != reported.protected_entries) {
    return mismatch("protected", c.protected_entries, reported.protected_entries);
  }
  if (c.evictable != reported.evictable) return mismatch("evictable", c.evictable, reported.evictable);
  if (m.leases.size() != reported.active_leases)
    return mismatch("leases", m.leases.size(), reported.active_leases);
  if (c.bytes_entries != reported.bytes_entries)
    return mismatch("entry bytes", c.bytes_entries, reported.bytes_entries);
  if (c.bytes_reserved != reported.bytes_reserved) {
    return mismatch("reserved bytes", c.bytes_reserved, reported.bytes_reserved);
  }
  if (c.bytes_detached != reported.bytes_detached) {
    return mismatch("detached bytes", c.bytes_detached, reported.bytes_detached);
  }
  if (m.ssd) {
    if (Status st = m.ssd->audit(); !st.ok()) return st;
    const SsdTierStats t = m.ssd->stats();
    if (t.taken != reported.promoting) return mismatch("ssd extents being read", t.taken, reported.promoting);
    if (t.writing != reported.spilling)
      return mismatch("ssd extents being written", t.writing, reported.spilling);
  }
  return check_stats_invariants(reported);
}

}  // namespace kvf::store
