// StoreStats: a consistent snapshot of one ChunkStore's gauges and counters (taken under the
// store's mutex), for the control API, metrics and tests. A plain value; copy it freely.
//
// Invariants (check_stats_invariants checks them; every snapshot satisfies them):
//   bytes_used + bytes_free == capacity_bytes
//   bytes_used == bytes_entries + bytes_reserved + bytes_detached       (allocated, aligned lengths)
//   reserves == inserts + aborts + expired_reservations + dropped_reservations + reservations
//   inserts == entries + evictions + cleared                            (every stored entry is
//                                                                         still there or left once)
//   leases_granted == leases_released + expired_leases + dropped_leases + active_leases
//   evictable + protected_entries == entries   (protected: pinned or leased, or both)
//   pinned <= protected_entries, leased_entries <= protected_entries + detached,
//   leased_entries <= active_leases
// A lookup of n keys that matches m counts m hits and, when m < n, one miss (the chain stops at
// the first key that is not stored); an acquire counts one hit or one miss.
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

  // Gauges.
  uint64_t entries = 0;            // committed and visible
  uint64_t reservations = 0;       // reserved or committing
  uint64_t detached = 0;           // cleared while leased
  uint64_t pinned = 0;             // visible entries with a pin count above zero
  uint64_t leased_entries = 0;     // entries (visible or detached) with at least one lease
  uint64_t protected_entries = 0;  // visible entries that are pinned or leased
  uint64_t evictable = 0;          // visible entries the eviction policy may pick
  uint64_t active_leases = 0;

  // Counters since the store was created.
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t reserves = 0;  // successful reserve() calls
  uint64_t inserts = 0;   // commits
  uint64_t aborts = 0;
  uint64_t expired_reservations = 0;  // writer missed the reservation timeout
  uint64_t dropped_reservations = 0;  // drop_client() of their writer
  uint64_t evictions = 0;
  uint64_t cleared = 0;
  uint64_t leases_granted = 0;
  uint64_t leases_released = 0;
  uint64_t expired_leases = 0;  // reader missed the lease timeout
  uint64_t dropped_leases = 0;  // drop_client() of their reader
};

// Ok when every invariant above holds; otherwise kInternal naming the first that does not.
Status check_stats_invariants(const StoreStats& s);

}  // namespace kvf::store
