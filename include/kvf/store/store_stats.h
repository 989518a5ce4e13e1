// StoreStats: a consistent snapshot of one ChunkStore's gauges and counters (taken under the
// store's mutex), for the control API, metrics and tests. A plain value; copy it freely.
//
// Fields without a prefix are the DRAM tier (the arena); ssd_* the SSD tier (all 0 without one).
// Invariants (check_stats_invariants checks them; every snapshot satisfies them):
//   bytes_used + bytes_free == capacity_bytes
//   bytes_used == bytes_entries + bytes_reserved + bytes_detached + bytes_promoting
//                 + bytes_spilling                                    (allocated, aligned lengths)
//   reserves == inserts + replacements + aborts + expired_reservations + dropped_reservations
//               + reservations                    (replacement reservations are reservations too)
//   inserts + promotions == entries + spilling + evictions + cleared   (every entry that came into
//                                  DRAM is still there, is on its way down, or left once)
//   leases_granted == leases_released + expired_leases + dropped_leases + active_leases
//   evictable + protected_entries == entries   (protected: pinned, leased or being re-encoded)
//   pinned <= protected_entries, leased_entries <= protected_entries + detached,
//   leased_entries <= active_leases
//   ssd_bytes_used + ssd_bytes_free == ssd_capacity_bytes
//   ssd_bytes_used == ssd_bytes_entries + ssd_bytes_promoting + ssd_bytes_spilling
//   ssd_spills == ssd_entries + ssd_evictions + promotions + ssd_cleared + ssd_dropped + promoting
//                                                   (every entry written to the SSD is still there,
//                                                    or left once, or is on its way up)
//   ssd_spills + ssd_spill_failures <= evictions   (DRAM evictions spill, or drop when they cannot)
// A lookup of n keys that matches m counts a hit per matched key in its tier (hits in DRAM,
// ssd_hits in the SSD) and, when m < n, one miss (the chain stops at the first key stored in
// neither tier), and with an SSD tier also one ssd_miss; an acquire likewise counts one hit of its
// tier or one miss. Per key, DRAM missed misses + ssd_hits keys and the SSD missed ssd_misses.
#pragma once

#include <cstdint>

#include "kvf/protocol/status.h"

namespace kvf::store {

struct StoreStats {
  // Arena.
  uint64_t capacity_bytes = 0;
  uint64_t bytes_used = 0;
  uint64_t bytes_free = 0;
  uint64_t largest_free_block = 0;  // bytes_free spread over many holes means fragmentation
  uint64_t bytes_entries = 0;       // committed, visible entries
  uint64_t bytes_reserved = 0;      // reservations being written
  uint64_t bytes_detached = 0;      // cleared entries kept until their last lease is released
  uint64_t bytes_promoting = 0;     // blocks being filled from the SSD tier
  uint64_t bytes_spilling = 0;      // blocks of entries being written to the SSD tier (not yet free)

  // Gauges.
  uint64_t entries = 0;            // committed and visible
  uint64_t reservations = 0;       // reserved or committing (replacements included)
  uint64_t promoting = 0;          // entries being read back from the SSD tier
  uint64_t spilling = 0;           // entries evicted or demoted, being written to the SSD tier
  uint64_t detached = 0;           // cleared while leased
  uint64_t pinned = 0;             // visible entries with a pin count above zero
  uint64_t leased_entries = 0;     // entries (visible or detached) with at least one lease
  uint64_t protected_entries = 0;  // visible entries that are pinned, leased or being re-encoded
  uint64_t evictable = 0;          // visible entries the eviction policy may pick
  uint64_t active_leases = 0;

  // Counters since the store was created.
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t reserves = 0;      // successful reserve() calls
  uint64_t inserts = 0;       // commits
  uint64_t replacements = 0;  // commit_replacement()s: entries re-encoded
  uint64_t aborts = 0;
  uint64_t expired_reservations = 0;  // writer missed the reservation timeout
  uint64_t dropped_reservations = 0;  // drop_client() of their writer
  uint64_t evictions = 0;  // entries evicted or demoted from DRAM (spilled to the SSD tier, or dropped)
  uint64_t cleared = 0;
  uint64_t promotions = 0;  // entries read back from the SSD tier into DRAM
  uint64_t leases_granted = 0;
  uint64_t leases_released = 0;
  uint64_t expired_leases = 0;  // reader missed the lease timeout
  uint64_t dropped_leases = 0;  // drop_client() of their reader

  // SSD tier.
  uint64_t ssd_capacity_bytes = 0;
  uint64_t ssd_bytes_used = 0;  // extents allocated
  uint64_t ssd_bytes_free = 0;
  uint64_t ssd_bytes_entries = 0;    // extents of entries in the tier
  uint64_t ssd_bytes_promoting = 0;  // extents being read back
  uint64_t ssd_bytes_spilling = 0;   // extents being written (spills in flight)
  uint64_t ssd_entries = 0;
  uint64_t ssd_hits = 0;
  uint64_t ssd_misses = 0;
  uint64_t ssd_spills = 0;          // entries written to the tier (DRAM evictions and demotions)
  uint64_t ssd_spill_failures = 0;  // DRAM evictions it could not take (I/O error, no space): dropped
  uint64_t ssd_evictions = 0;       // entries the tier evicted to make room
  uint64_t ssd_cleared = 0;
  uint64_t ssd_dropped = 0;  // entries whose read back failed (checksum mismatch, I/O error)
  uint64_t ssd_bytes_written = 0;
  uint64_t ssd_bytes_read = 0;
};

// Ok when every invariant above holds; otherwise kInternal naming the first that does not.
Status check_stats_invariants(const StoreStats& s);

}  // namespace kvf::store
