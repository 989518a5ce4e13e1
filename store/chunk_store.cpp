#include "kvf/store/chunk_store.h"

#include <spdlog/spdlog.h>
#include <xxhash.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kvf/store/arena_allocator.h"

namespace kvf::store {

using protocol::ChunkKey;

uint64_t chunk_checksum(const uint8_t* data, uint64_t length) {
  return XXH3_64bits(data, length);
}

namespace {

enum class EntryState : uint8_t { kReserved, kCommitting, kCommitted };

struct Entry {
  ArenaBlock block;    // what the allocator gave (aligned length)
  uint64_t bytes = 0;  // what the writer asked for; the chunk's length
  uint64_t checksum = 0;
  ChunkKey model;  // the fingerprint the key was hashed with, as the writer said
  uint64_t reservation_id = 0;
  ClientId writer = 0;
  StoreClock::time_point deadline{};  // reservations only
  uint32_t pins = 0;
  uint32_t leases = 0;
  EntryState state = EntryState::kReserved;
  bool detached = false;  // cleared while leased: out of the index, bytes kept for the readers
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

}  // namespace

struct ChunkStore::Impl {
  Impl(gpudirect::MemoryRegion region, ArenaAllocator alloc, ChunkStoreOptions opts)
      : arena(std::move(region)), allocator(std::move(alloc)), options(std::move(opts)) {
    policy = options.policy ? std::move(options.policy) : make_lru_policy();
  }

  StoreClock::time_point now() const { return options.clock ? options.clock() : StoreClock::now(); }

  static bool is_protected(const Entry& e) { return e.pins > 0 || e.leases > 0; }

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

  void free_block(const Entry& e) {
    // Every block here came from this allocator and is freed once; a refusal would be a store bug,
    // and leaking the block is safer than corrupting the free list. audit() then reports it.
    if (Status st = allocator.free(e.block); !st.ok()) spdlog::error("chunk store: {}", st.to_string());
  }

  enum class Removal { kEvicted, kCleared };
  // Takes a visible committed entry out of the index: frees its bytes, or, when leased, keeps
  // them in the detached map until the last lease goes.
  void remove_visible(std::unordered_map<ChunkKey, Entry>::iterator it, Removal why) {
    Entry& e = it->second;
    if (is_protected(e)) {
      --s.protected_entries;
    } else {
      --s.evictable;
      policy->on_remove(it->first);
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
    free_block(e);
    index.erase(it);
  }

  enum class ReservationEnd { kAborted, kExpired, kDropped };
  void end_reservation(std::unordered_map<ChunkKey, Entry>::iterator it, ReservationEnd why) {
    Entry& e = it->second;
    free_block(e);
    --s.reservations;
    s.bytes_reserved -= e.block.length;
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
      free_block(e);
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
    for (auto it = leases.begin(); it != leases.end();) {
      auto current = it++;
      if (current->second.deadline <= t) {
        end_lease(current, LeaseEnd::kExpired);
        ++r.leases;
      }
    }
    return r;
  }

  // Allocates `bytes`, evicting in policy order; reaps expired holds once before giving up.
  Result<ArenaBlock> allocate_evicting(uint64_t bytes) {
    for (int pass = 0; pass < 2; ++pass) {
      for (;;) {
        if (auto block = allocator.allocate(bytes)) return *block;
        auto victim = policy->victim();
        if (!victim) break;
        auto it = index.find(*victim);
        if (it == index.end() || it->second.state != EntryState::kCommitted || is_protected(it->second)) {
          return Status(ErrorCode::kInternal, "eviction policy offered " + hex(*victim) +
                                                  ", which is not an evictable entry of this store");
        }
        remove_visible(it, Removal::kEvicted);
      }
      if (pass == 0) {
        ReapResult r = reap_locked(now());
        if (r.reservations == 0 && r.leases == 0) break;
      }
    }
    return Status(ErrorCode::kOutOfMemory,
                  "store full: cannot place " + std::to_string(bytes) + " bytes (" +
                      std::to_string(allocator.bytes_free()) + " of " + std::to_string(allocator.capacity()) +
                      " free, largest hole " + std::to_string(allocator.largest_free()) +
                      ") and nothing is evictable: " + std::to_string(s.pinned) + " entries pinned, " +
                      std::to_string(s.leased_entries) + " leased, " + std::to_string(s.reservations) +
                      " reservations being written");
  }

  StoreStats snapshot() const {
    StoreStats out = s;
    out.capacity_bytes = allocator.capacity();
    out.bytes_used = allocator.bytes_used();
    out.bytes_free = allocator.bytes_free();
    out.largest_free_block = allocator.largest_free();
    return out;
  }

  gpudirect::MemoryRegion arena;
  ArenaAllocator allocator;
  ChunkStoreOptions options;
  std::unique_ptr<EvictionPolicy> policy;

  mutable std::mutex mu;
  std::unordered_map<ChunkKey, Entry> index;            // reserved, committing and committed entries
  std::unordered_multimap<ChunkKey, Entry> detached;    // cleared while leased
  std::unordered_map<uint64_t, ChunkKey> reservations;  // reservation id -> key (not yet committed)
  std::unordered_map<uint64_t, LeaseRecord> leases;
  uint64_t next_reservation_id = 1;
  uint64_t next_lease_id = 1;
  StoreStats s;  // gauges and counters; the arena fields are filled in by stats()
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
  auto impl = std::make_unique<Impl>(std::move(arena), std::move(allocator.value()), std::move(options));
  return std::unique_ptr<ChunkStore>(new ChunkStore(std::move(impl)));
}

ChunkStore::ChunkStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ChunkStore::~ChunkStore() = default;

const gpudirect::MemoryRegion& ChunkStore::arena() const {
  return impl_->arena;
}

std::span<uint8_t> ChunkStore::bytes(const Reservation& r) const {
  return {impl_->arena.data() + r.offset, static_cast<size_t>(r.length)};
}

std::span<const uint8_t> ChunkStore::bytes(const Lease& l) const {
  return {impl_->arena.data() + l.offset, static_cast<size_t>(l.length)};
}

Result<Reservation> ChunkStore::reserve(const ChunkKey& key, uint64_t bytes, ClientId writer,
                                        const ChunkKey& model) {
  Impl& m = *impl_;
  if (bytes == 0) return Status(ErrorCode::kInvalidArgument, "reserve of chunk " + hex(key) + ": zero bytes");
  if (bytes > m.allocator.capacity()) {
    return Status(ErrorCode::kInvalidArgument, "reserve of chunk " + hex(key) + ": " + std::to_string(bytes) +
                                                   " bytes can never fit a store arena of " +
                                                   std::to_string(m.allocator.capacity()));
  }
  std::lock_guard lock(m.mu);
  if (auto it = m.index.find(key); it != m.index.end()) {
    if (it->second.state == EntryState::kCommitted) {
      return Status(ErrorCode::kAborted, "chunk " + hex(key) + " is already stored");
    }
    return Status(ErrorCode::kAborted,
                  "chunk " + hex(key) + " is being stored by writer " + std::to_string(it->second.writer));
  }
  auto block = m.allocate_evicting(bytes);
  if (!block.ok()) return block.status();
  Entry e;
  e.block = block.value();
  e.bytes = bytes;
  e.model = model;
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
    if (it == m.index.end() || it->second.reservation_id != reservation_id) {
      return Status(ErrorCode::kNotFound, "commit of chunk " + hex(key) + ": no reservation " +
                                              std::to_string(reservation_id) +
                                              " (aborted, expired, dropped or never made)");
    }
    Entry& e = it->second;
    if (e.state == EntryState::kCommitted) {
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
  uint64_t sum = chunk_checksum(data, length);
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
  if (it == m.index.end() || it->second.reservation_id != reservation_id) {
    return Status(ErrorCode::kNotFound,
                  "abort of chunk " + hex(key) + ": no reservation " + std::to_string(reservation_id));
  }
  if (it->second.state != EntryState::kReserved) {
    return Status(ErrorCode::kInvalidArgument,
                  "abort of chunk " + hex(key) + ": already committed or committing");
  }
  m.end_reservation(it, Impl::ReservationEnd::kAborted);
  return Status::Ok();
}

size_t ChunkStore::lookup(std::span<const ChunkKey> keys) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  size_t matched = 0;
  for (const ChunkKey& key : keys) {
    auto it = m.index.find(key);
    if (it == m.index.end() || it->second.state != EntryState::kCommitted) {
      ++m.s.misses;
      break;
    }
    ++matched;
  }
  m.s.hits += matched;
  return matched;
}

std::optional<EntryInfo> ChunkStore::peek(const ChunkKey& key) const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  auto it = m.index.find(key);
  if (it == m.index.end() || it->second.state != EntryState::kCommitted) return std::nullopt;
  const Entry& e = it->second;
  return EntryInfo{e.bytes, e.model, e.pins, e.leases};
}

EntryTotals ChunkStore::totals() const {
  const Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  EntryTotals t;
  for (const auto& [key, e] : m.index) {
    if (e.state != EntryState::kCommitted) continue;
    ++t.entries;
    t.bytes += e.bytes;
  }
  return t;
}

Result<Lease> ChunkStore::acquire(const ChunkKey& key, ClientId reader) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  auto it = m.index.find(key);
  if (it == m.index.end() || it->second.state != EntryState::kCommitted) {
    ++m.s.misses;
    return Status(ErrorCode::kNotFound, "chunk " + hex(key) + " is not stored");
  }
  ++m.s.hits;
  Entry& e = it->second;
  if (!Impl::is_protected(e)) m.protect(key);
  if (e.leases++ == 0) ++m.s.leased_entries;
  uint64_t id = m.next_lease_id++;
  m.leases.emplace(id, LeaseRecord{key, &e, reader, m.now() + m.options.lease_timeout});
  ++m.s.leases_granted;
  ++m.s.active_leases;
  return Lease{id, key, e.block.offset, e.bytes, e.checksum, e.model};
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
  uint64_t sum = chunk_checksum(arena.data() + lease.offset, lease.length);
  if (sum != lease.checksum) {
    return Status(ErrorCode::kVerifyFailed,
                  "chunk " + hex(lease.key) + ": checksum of the stored bytes differs");
  }
  return Status::Ok();
}

Status ChunkStore::pin(const ChunkKey& key) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  auto it = m.index.find(key);
  if (it == m.index.end() || it->second.state != EntryState::kCommitted) {
    return Status(ErrorCode::kNotFound, "pin of chunk " + hex(key) + ": not stored");
  }
  Entry& e = it->second;
  if (!Impl::is_protected(e)) m.protect(key);
  if (e.pins++ == 0) ++m.s.pinned;
  return Status::Ok();
}

Status ChunkStore::unpin(const ChunkKey& key) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  auto it = m.index.find(key);
  if (it == m.index.end() || it->second.state != EntryState::kCommitted) {
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

ClearResult ChunkStore::clear_all() {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  ClearResult r;
  for (auto it = m.index.begin(); it != m.index.end();) {
    auto current = it++;  // remove_visible erases or extracts only the current element
    if (current->second.state != EntryState::kCommitted) continue;
    if (current->second.leases > 0) ++r.deferred;
    r.bytes += current->second.block.length;
    m.remove_visible(current, Impl::Removal::kCleared);
    ++r.removed;
  }
  return r;
}

ClearResult ChunkStore::clear(std::span<const ChunkKey> keys) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  ClearResult r;
  for (const ChunkKey& key : keys) {
    auto it = m.index.find(key);
    if (it == m.index.end() || it->second.state != EntryState::kCommitted) continue;
    if (it->second.leases > 0) ++r.deferred;
    r.bytes += it->second.block.length;
    m.remove_visible(it, Impl::Removal::kCleared);
    ++r.removed;
  }
  return r;
}

ClearResult ChunkStore::clear_model(const ChunkKey& model) {
  Impl& m = *impl_;
  std::lock_guard lock(m.mu);
  ClearResult r;
  for (auto it = m.index.begin(); it != m.index.end();) {
    auto current = it++;  // remove_visible erases or extracts only the current element
    const Entry& e = current->second;
    if (e.state != EntryState::kCommitted || !(e.model == model)) continue;
    if (e.leases > 0) ++r.deferred;
    r.bytes += e.block.length;
    m.remove_visible(current, Impl::Removal::kCleared);
    ++r.removed;
  }
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
    blocks.push_back(e.block);
    if (e.detached) return Status(ErrorCode::kInternal, "store audit: detached entry in the index");
    if (e.state != EntryState::kCommitted) {
      ++c.reservations;
      c.bytes_reserved += e.block.length;
      auto r = m.reservations.find(e.reservation_id);
      if (r == m.reservations.end() || !(r->second == key)) {
        return Status(ErrorCode::kInternal, "store audit: reservation of " + hex(key) + " is not registered");
      }
      if (e.pins != 0 || e.leases != 0) return Status(ErrorCode::kInternal, "store audit: held reservation");
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
    lease_refs += e.leases;
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
  if (m.reservations.size() != c.reservations)
    return mismatch("reservations", c.reservations, m.reservations.size());
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
  return check_stats_invariants(reported);
}

}  // namespace kvf::store
