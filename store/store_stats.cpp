#include "kvf/store/store_stats.h"

#include <string>

namespace kvf::store {

namespace {

Status broken(const std::string& what) {
  return Status(ErrorCode::kInternal, "store stats do not add up: " + what);
}

std::string n(uint64_t v) {
  return std::to_string(v);
}

}  // namespace

Status check_stats_invariants(const StoreStats& s) {
  if (s.bytes_used + s.bytes_free != s.capacity_bytes) {
    return broken("used " + n(s.bytes_used) + " + free " + n(s.bytes_free) + " != capacity " +
                  n(s.capacity_bytes));
  }
  if (s.bytes_used !=
      s.bytes_entries + s.bytes_reserved + s.bytes_detached + s.bytes_promoting + s.bytes_spilling) {
    return broken("used " + n(s.bytes_used) + " != entries " + n(s.bytes_entries) + " + reserved " +
                  n(s.bytes_reserved) + " + detached " + n(s.bytes_detached) + " + promoting " +
                  n(s.bytes_promoting) + " + spilling " + n(s.bytes_spilling));
  }
  if (s.largest_free_block > s.bytes_free) return broken("largest free block exceeds free bytes");
  if (s.reserves != s.inserts + s.replacements + s.aborts + s.expired_reservations + s.dropped_reservations +
                        s.reservations) {
    return broken("reserves " + n(s.reserves) + " != inserts " + n(s.inserts) + " + replacements " +
                  n(s.replacements) + " + aborts " + n(s.aborts) + " + expired " + n(s.expired_reservations) +
                  " + dropped " + n(s.dropped_reservations) + " + open " + n(s.reservations));
  }
  if (s.inserts + s.promotions != s.entries + s.spilling + s.evictions + s.cleared) {
    return broken("inserts " + n(s.inserts) + " + promotions " + n(s.promotions) + " != entries " +
                  n(s.entries) + " + spilling " + n(s.spilling) + " + evictions " + n(s.evictions) +
                  " + cleared " + n(s.cleared));
  }
  if (s.leases_granted != s.leases_released + s.expired_leases + s.dropped_leases + s.active_leases) {
    return broken("leases granted " + n(s.leases_granted) + " != released " + n(s.leases_released) +
                  " + expired " + n(s.expired_leases) + " + dropped " + n(s.dropped_leases) + " + active " +
                  n(s.active_leases));
  }
  if (s.evictable + s.protected_entries != s.entries) {
    return broken("evictable " + n(s.evictable) + " + protected " + n(s.protected_entries) + " != entries " +
                  n(s.entries));
  }
  if (s.pinned > s.protected_entries) return broken("more pinned entries than protected ones");
  if (s.leased_entries > s.protected_entries + s.detached)
    return broken("more leased entries than held ones");
  if (s.leased_entries > s.active_leases) return broken("more leased entries than leases");
  if (s.ssd_bytes_used + s.ssd_bytes_free != s.ssd_capacity_bytes) {
    return broken("ssd used " + n(s.ssd_bytes_used) + " + free " + n(s.ssd_bytes_free) + " != capacity " +
                  n(s.ssd_capacity_bytes));
  }
  if (s.ssd_bytes_used != s.ssd_bytes_entries + s.ssd_bytes_promoting + s.ssd_bytes_spilling) {
    return broken("ssd used " + n(s.ssd_bytes_used) + " != entries " + n(s.ssd_bytes_entries) +
                  " + promoting " + n(s.ssd_bytes_promoting) + " + spilling " + n(s.ssd_bytes_spilling));
  }
  if (s.ssd_spills !=
      s.ssd_entries + s.ssd_evictions + s.promotions + s.ssd_cleared + s.ssd_dropped + s.promoting) {
    return broken("ssd spills " + n(s.ssd_spills) + " != entries " + n(s.ssd_entries) + " + evictions " +
                  n(s.ssd_evictions) + " + promotions " + n(s.promotions) + " + cleared " + n(s.ssd_cleared) +
                  " + dropped " + n(s.ssd_dropped) + " + promoting " + n(s.promoting));
  }
  if (s.ssd_spills + s.ssd_spill_failures > s.evictions) {
    return broken("ssd spills " + n(s.ssd_spills) + " + spill failures " + n(s.ssd_spill_failures) +
                  " exceed DRAM evictions " + n(s.evictions));
  }
  return Status::Ok();
}

}  // namespace kvf::store
